"""`mlsae explore RUN`: the explorer's web app (Starlette on uvicorn), offline and local.

Safe by default: binds 127.0.0.1 unless told otherwise; the index is opened read-only; no
request names a file (static files are a fixed list of packaged names, everything else is
addressed by integer ids and text); every parameter is bounded and a bad one gets a 400 with
one clear line; model runs are serialised (`mlsae.explore.live.Live`). The page itself is one
HTML file whose script routes by the URL's #fragment, so every page works from the printed URL.
"""

from __future__ import annotations

import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlsae.core.errors import MlsaeError
from mlsae.explore.db import IndexDB
from mlsae.explore.live import BadRequest, Live

log = logging.getLogger(__name__)

STATIC = {  # URL name -> (package folder, file, media type)
    "app.js": ("explore/static", "app.js", "text/javascript; charset=utf-8"),
    "app.css": ("explore/static", "app.css", "text/css; charset=utf-8"),
    "cytoscape.min.js": ("assets", "cytoscape.min.js", "text/javascript; charset=utf-8"),
}
MAX_RESULTS = 200
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' "
    "'unsafe-inline'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(folder: str, name: str) -> bytes:
    return (resources.files("mlsae").joinpath(folder) / name).read_bytes()


def int_arg(req: Request, name: str, lo: int, hi: int, default: int) -> int:
    """An integer query parameter in [lo, hi] (or the default when absent)."""
    v = opt_int_arg(req, name, lo, hi)
    return default if v is None else v


def opt_int_arg(req: Request, name: str, lo: int, hi: int) -> int | None:
    """An optional integer query parameter in [lo, hi] (None when absent)."""
    raw = req.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {raw[:40]!r}") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, not {v}")
    return v


def float_arg(req: Request, name: str, lo: float, hi: float, default: float) -> float:
    raw = req.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {raw[:40]!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise BadRequest(f"{name} must be between {lo:g} and {hi:g}, not {raw[:40]}")
    return v


def text_arg(req: Request, name: str, max_len: int) -> str:
    v = req.query_params.get(name, "")
    if len(v) > max_len:
        raise BadRequest(f"{name} is {len(v)} characters long; at most {max_len}")
    return v


class Explorer:
    """The app's state: the read-only index, the live model (lazy), the feature graph."""

    def __init__(self, run: Path, db: Path, model: str | None, evolution: Path | None,
                 max_tokens: int = 128, dtype: str = "float32") -> None:  # fmt: skip
        self.db = IndexDB(db)
        self.live = Live(run, model or self.db.meta["model"], dtype, max_tokens)
        self.graph = None
        if evolution is not None:
            from mlsae.explore.graphview import FeatureGraphView

            self.graph = FeatureGraphView(evolution)
        # a per-layer set: the SAE that holds layer l's features (for graph -> latent links)
        self.sae_of_layer = {
            s["layers"][0]: s["sae"] for s in self.db.saes if len(s["layers"]) == 1
        }

    def sae_arg(self, req: Request) -> dict[str, Any]:
        i = int_arg(req, "sae", 0, len(self.db.saes) - 1, 0)
        return self.db.saes[i]

    # ------------------------------------------------------------------ endpoints

    def info(self, req: Request) -> dict[str, Any]:
        m = self.db.meta
        return names_not_paths({
            "run": Path(m["run"]).name, "model": m["model"], "source": m["source"],
            "n_tokens": m["n_stream_tokens"], "context_length": m["context_length"],
            "top_n": m["top_n"], "window": m["window"], "saes": self.db.saes,
            "hist_edges": m["hist_edges"], "max_tokens": self.live.max_tokens,
            "graph": self.graph.summary() if self.graph is not None else None,
        })  # fmt: skip

    def latent(self, req: Request) -> dict[str, Any]:
        s = self.sae_arg(req)
        j = int_arg(req, "latent", 0, s["d_sae"] - 1, 0)
        layer = opt_int_arg(req, "layer", min(s["layers"]), max(s["layers"]))
        if layer is not None and layer not in s["layers"]:
            raise BadRequest(f"layer must be one of the SAE's layers {s['layers']}")
        lat = self.db.latent(s["sae"], j)
        if lat is None:
            raise BadRequest(f"latent {j} is not in the index")
        top = self.db.examples(s["sae"], j, "top", layer, limit=self.db.meta["top_n"])
        lat.update(sae=s["sae"], layers=s["layers"], layer=layer, top=top,
                   quantile=self.db.examples(s["sae"], j, "quantile"))  # fmt: skip
        lat["neighbours"] = [
            {**d, "cos": c}
            for (n, c), d in zip(lat["neighbours"], self.db.summaries(s["sae"], [n for n, _ in lat["neighbours"]]), strict=False)
        ]  # fmt: skip
        if self.graph is not None and len(s["layers"]) == 1:
            lat["graph"] = (s["layers"][0], j) in self.graph.index
        return lat

    def search(self, req: Request) -> dict[str, Any]:
        s = self.sae_arg(req)
        limit = int_arg(req, "limit", 1, MAX_RESULTS, 50)
        token, text = text_arg(req, "token", 100), text_arg(req, "text", 200)
        lo = float_arg(req, "lo", -1e6, 1e6, -1e6)
        hi = float_arg(req, "hi", -1e6, 1e6, 1e6)
        found: dict[int, dict[str, Any]] = {}
        if token.strip():
            ids = self.db.token_ids(token)
            for j, t, n in self.db.search_token(s["sae"], ids, limit):
                found.setdefault(j, {"why": f"{n} top examples on {self.db.token(t)!r}"})
        elif text.strip():
            for j in self.db.search_text(s["sae"], text, limit):
                found[j] = {"why": "example text"}
        else:
            for j in self.db.search_layers(s["sae"], lo, hi, limit):
                found[j] = {"why": "mean layer"}
        rows = self.db.summaries(s["sae"], list(found), match=text if text.strip() else "")
        return {"sae": s["sae"], "results": [{**r, **found[r["latent"]]} for r in rows]}

    def prompt(self, req: Request) -> dict[str, Any]:
        s = self.sae_arg(req)
        text = text_arg(req, "text", 2000)
        top = max(s["layers"])
        return self.live.prompt(
            text, s["sae"],
            int_arg(req, "latent", 0, s["d_sae"] - 1, 0),
            opt_int_arg(req, "layer", 0, top), opt_int_arg(req, "pos", 0, 10**6),
            opt_int_arg(req, "steer", 0, s["d_sae"] - 1),
            float_arg(req, "factor", -1e9, 1e9, 0.0),
        )  # fmt: skip

    def graph_feature(self, req: Request) -> dict[str, Any]:
        if self.graph is None:
            raise BadRequest("no feature graph: start `mlsae explore` with --evolution DIR")
        g = self.graph
        if req.query_params.get("layer") is None:
            return {"summary": g.summary(), "starts": g.strongest()}
        layer = int_arg(req, "layer", min(g.layers), max(g.layers), min(g.layers))
        feature = int_arg(req, "feature", 0, 10**9, 0)
        try:
            v = g.node(layer, feature)
        except KeyError as e:
            raise BadRequest(str(e.args[0])) from None
        back = int_arg(req, "back", 0, 8, 2)
        fwd = int_arg(req, "fwd", 0, 8, 2)
        thr = float_arg(req, "min", -1.0, 1.0, 0.3)
        per = int_arg(req, "per_layer", 1, 50, 12)
        out = g.neighbourhood(v, back, fwd, thr, per)
        for n in out["nodes"]:
            n["sae"] = self.sae_of_layer.get(n["layer"])
        out.update(focus=g.describe(v), chain=g.chain(v),
                   community=g.community_info(int(g.community[v])), summary=g.summary())  # fmt: skip
        return out


def create_app(
    run: str | Path, db: str | Path | None = None, model: str | None = None,
    evolution: str | Path | None = None, max_tokens: int = 128, dtype: str = "float32",
    host: str = "127.0.0.1",
) -> Starlette:  # fmt: skip
    """The ASGI app of `mlsae explore` (the index defaults to RUN/explore.sqlite). `host`: the
    address it is bound to; requests naming another host are refused (DNS rebinding)."""
    from mlsae.explore.index import DB_NAME

    run = Path(run)
    path = Path(db) if db is not None else (run if run.is_dir() else run.parent) / DB_NAME
    ex = Explorer(run, path, model, Path(evolution) if evolution else None, max_tokens, dtype)
    check_startup(ex, run, path, model)
    page = _asset("explore/static", "index.html")

    def api(fn):
        def endpoint(req: Request) -> Response:
            try:
                return JSONResponse(fn(req), headers=SECURITY_HEADERS)
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=400, headers=SECURITY_HEADERS)
            except MlsaeError as e:
                log.warning(f"{req.url.path}: {e}")
                return JSONResponse({"error": str(e)}, status_code=500, headers=SECURITY_HEADERS)

        return endpoint

    def index(req: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    def static(req: Request) -> Response:
        entry = STATIC.get(req.path_params["name"])
        if entry is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        folder, name, media = entry
        return Response(_asset(folder, name), media_type=media,
                        headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})  # fmt: skip

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/favicon.ico", lambda req: Response(status_code=204)),
        Route("/api/info", api(ex.info)),
        Route("/api/latent", api(ex.latent)),
        Route("/api/search", api(ex.search)),
        Route("/api/prompt", api(ex.prompt)),
        Route("/api/graph", api(ex.graph_feature)),
    ]
    guard = Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))
    app = Starlette(routes=routes, middleware=[guard])
    app.state.explorer = ex
    return app


# ----------------------------------------------------------------------------- safety


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str) -> list[str]:
    """The Host header values the server answers: the loopback names and the bound address
    (any, when bound to every interface: the user chose to expose it)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    bound = f"[{host}]" if ":" in host else host
    return sorted({*LOOPBACK, bound.lower()})


def names_not_paths(info: dict[str, Any]) -> dict[str, Any]:
    """/api/info without absolute paths (a page on another site must not learn the folder
    layout): the model, cache and SAE folders by their last names."""
    name = lambda v: Path(str(v)).name if isinstance(v, str) and ("/" in v or "\\" in v) else v  # noqa: E731
    out = dict(info)
    out["model"] = name(info.get("model"))
    src = info.get("source")
    out["source"] = {k: name(v) for k, v in src.items()} if isinstance(src, dict) else src
    out["saes"] = [{**s, "path": Path(str(s.get("path", ""))).name} for s in info.get("saes", [])]
    return out


def check_startup(ex: Explorer, run: Path, index: Path, model: str | None) -> None:
    """Before serving: the SAEs in RUN are the ones indexed, the model is there, and
    --max-tokens fits its positions."""
    from mlsae.explore.source import check_served_saes, run_saes

    check_served_saes(run_saes(run), ex.db.sae_sha256, index)
    n_pos = model_positions(model or ex.db.meta["model"])
    if n_pos is not None and ex.live.max_tokens > n_pos - 1:  # a BOS may be prepended
        log.warning(f"--max-tokens {ex.live.max_tokens} does not fit the model's {n_pos} "
                    f"positions: prompts are capped at {n_pos - 1} tokens")  # fmt: skip
        ex.live.max_tokens = n_pos - 1


def model_positions(model: str) -> int | None:
    """The model's number of positions (None when its config does not say); MlsaeError if
    the model cannot be found."""
    from mlsae.data.model import model_positions as positions

    return positions(model)
