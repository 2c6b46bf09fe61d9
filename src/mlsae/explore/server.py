"""`mlsae explore RUN`: the explorer's web app (Starlette on uvicorn), offline and local.

Safe by default: binds 127.0.0.1 unless told otherwise; the index is opened read-only; no
request names a file (static files are a fixed list of packaged names, everything else is
addressed by integer ids and text); every parameter is bounded and a bad one gets a 400 with
one clear line; model runs are serialised (`mlsae.explore.live.Live`). The page itself is one
HTML file whose script routes by the URL's #fragment, so every page works from the printed URL.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlsae.core.errors import MlsaeError
from mlsae.explore.db import IndexDB
from mlsae.explore.http import (
    SECURITY_HEADERS,
    allowed_hosts,
    float_arg,
    int_arg,
    names_not_paths,
    opt_int_arg,
    text_arg,
)
from mlsae.explore.live import BadRequest, Live, SteerRequest
from mlsae.explore.tokens import display_tokens

log = logging.getLogger(__name__)

STATIC = {  # URL name -> (package folder, file, media type)
    "app.js": ("explore/static", "app.js", "text/javascript; charset=utf-8"),
    "app.css": ("explore/static", "app.css", "text/css; charset=utf-8"),
    "cytoscape.min.js": ("assets", "cytoscape.min.js", "text/javascript; charset=utf-8"),
}
MAX_RESULTS = 200
MAX_CONTEXT = 64  # tokens either side of an expanded example


def _asset(folder: str, name: str) -> bytes:
    return (resources.files("mlsae").joinpath(folder) / name).read_bytes()


class Explorer:
    """The app's state: the read-only index, the live model (lazy), the feature graph."""

    def __init__(
        self,
        run: Path,
        db: Path,
        model: str | None,
        evolution: Path | None,
        max_tokens: int = 128,
        dtype: str = "float32",
        dense: float = 0.1,
    ) -> None:
        self.db = IndexDB(db)
        self.dense = float(dense)
        frag = self.db.meta.get("vocab_bytes") or {}
        self.frag = {int(k): bytes.fromhex(v) for k, v in frag.items()}
        # per SAE: each latent's share of tokens active and maximum activation (by latent id)
        self.freq: list[np.ndarray] = []
        self.max_act: list[np.ndarray] = []
        for s in self.db.saes:
            rows = self.db.q("SELECT latent, freq, max_act FROM latents WHERE sae=?", (s["sae"],))
            f, mx = np.zeros(s["d_sae"]), np.zeros(s["d_sae"])
            for j, fj, mj in rows:
                if 0 <= j < s["d_sae"]:
                    f[j], mx[j] = fj or 0.0, mj or 0.0
            self.freq.append(f)
            self.max_act.append(mx)
        self.live = Live(run, model or self.db.meta["model"], dtype, max_tokens)
        self.graph = None
        if evolution is not None:
            from mlsae.explore.graphview import FeatureGraphView

            self.graph = FeatureGraphView(evolution)
        # a per-layer set: the SAE that holds layer l's features (for graph -> latent links)
        self.sae_of_layer = {
            s["layers"][0]: s["sae"] for s in self.db.saes if len(s["layers"]) == 1
        }

    def show_ids(self, ids: list[int]) -> list[str]:
        """Display strings of indexed token ids (characters split over tokens merged)."""
        return display_tokens([self.frag.get(i) or self.db.token(i).encode() for i in ids])

    def dense_of(self, sae: int, latents: list[int]) -> list[int]:
        """The latents among these active on more than the dense share of tokens."""
        f = self.freq[sae]
        return [j for j in latents if 0 <= j < len(f) and f[j] > self.dense]

    def _readable(self, e: dict[str, Any]) -> dict[str, Any]:
        lo = e["pos"] - e["at"]
        e["tokens"] = self.show_ids(self.db.stream[lo : lo + len(e["tokens"])].tolist())
        return e

    def sae_arg(self, req: Request) -> dict[str, Any]:
        i = int_arg(req, "sae", 0, len(self.db.saes) - 1, 0)
        return self.db.saes[i]

    # ------------------------------------------------------------------ endpoints

    def info(self, req: Request) -> dict[str, Any]:
        m = self.db.meta
        return names_not_paths(
            {
                "run": Path(m["run"]).name,
                "model": m["model"],
                "source": m["source"],
                "n_tokens": m["n_stream_tokens"],
                "context_length": m["context_length"],
                "top_n": m["top_n"],
                "window": m["window"],
                "saes": self.db.saes,
                "hist_edges": m["hist_edges"],
                "max_tokens": self.live.max_tokens,
                "graph": self.graph.summary() if self.graph is not None else None,
                "dense_share": self.dense,
            }
        )

    def latent(self, req: Request) -> dict[str, Any]:
        s = self.sae_arg(req)
        j = int_arg(req, "latent", 0, s["d_sae"] - 1, 0)
        layer = opt_int_arg(req, "layer", min(s["layers"]), max(s["layers"]))
        if layer is not None and layer not in s["layers"]:
            raise BadRequest(f"layer must be one of the SAE's layers {s['layers']}")
        lat = self.db.latent(s["sae"], j)
        if lat is None:
            raise BadRequest(f"latent {j} is not in the index")
        n = self.db.meta["top_n"]
        if layer is None and len(s["layers"]) > 1:
            top = by_position(self.db.examples(s["sae"], j, "top"), n)
        else:
            top = self.db.examples(s["sae"], j, "top", layer, limit=n)
        quantile = self.db.examples(s["sae"], j, "quantile")
        for e in top + quantile:
            self._readable(e)
        for key in ("logit_pos", "logit_neg", "top_tokens"):
            for t in lat[key]:
                t["token"] = self.show_ids([t["id"]])[0]
        lat.update(
            sae=s["sae"],
            layers=s["layers"],
            layer=layer,
            top=top,
            quantile=quantile,
            dense=(lat["freq"] or 0.0) > self.dense,
            dense_share=self.dense,
        )
        lat["neighbours"] = [
            {**d, "cos": c}
            for (n, c), d in zip(
                lat["neighbours"],
                self.db.summaries(s["sae"], [n for n, _ in lat["neighbours"]]),
                strict=False,
            )
        ]
        for d in lat["neighbours"]:
            d["dense"] = bool(self.freq[s["sae"]][d["latent"]] > self.dense)
        if self.graph is not None and len(s["layers"]) == 1:
            lat["graph"] = (s["layers"][0], j) in self.graph.index
        return lat

    def search(self, req: Request) -> dict[str, Any]:
        """Latents by token, by example text or by mean layer; `hide_dense=1` drops dense ones.
        An empty result says why (`empty`)."""
        s = self.sae_arg(req)
        limit = int_arg(req, "limit", 1, MAX_RESULTS, 50)
        token, text = text_arg(req, "token", 100), text_arg(req, "text", 200)
        lo = float_arg(req, "lo", -1e6, 1e6, -1e6)
        hi = float_arg(req, "hi", -1e6, 1e6, 1e6)
        hide = int_arg(req, "hide_dense", 0, 1, 0) == 1
        want = limit + (int((self.freq[s["sae"]] > self.dense).sum()) if hide else 0)
        found: dict[int, dict[str, Any]] = {}
        empty = ""
        if token.strip():
            ids = self.db.token_ids(token)
            for j, t, n in self.db.search_token(s["sae"], ids, want):
                word = self.show_ids([t])[0]
                found.setdefault(j, {"why": f"{n} top examples on {word!r}"})
            empty = self._why_no_token(token, ids, s["n_tokens"])
            match = token.strip()
        elif text.strip():
            for j in self.db.search_text(s["sae"], text, want):
                found[j] = {"why": "example text"}
            empty = f"no latent's best examples contain {text!r}"
            match = text
        else:
            for j in self.db.search_layers(s["sae"], lo, hi, want):
                found[j] = {"why": "mean layer"}
            empty = f"no latent has its mean layer between {lo:g} and {hi:g}"
            match = ""
        dense = set(self.dense_of(s["sae"], list(found)))
        n_hidden = len(dense) if hide else 0
        keep = [j for j in found if not (hide and j in dense)][:limit]
        rows = self.db.summaries(s["sae"], keep, match=match)
        if hide and n_hidden and not rows:
            empty = (
                f"{n_hidden} latent(s) matched, all dense (active on > {self.dense:.0%} of tokens)"
            )
        results = [{**r, **found[r["latent"]], "dense": r["latent"] in dense} for r in rows]
        return {
            "sae": s["sae"],
            "results": results,
            "hidden_dense": n_hidden,
            "dense_share": self.dense,
            "empty": "" if results else empty,
        }

    def _why_no_token(self, token: str, ids: list[int], n: int) -> str:
        """Why a search by token found nothing (said only when the result is empty)."""
        if not ids:
            return f"no token of the vocabulary reads {token.strip()!r} (ignoring case and spaces)"
        seen = int(np.isin(self.db.stream, ids).sum())
        if seen == 0:
            return f"{token.strip()!r} never occurs in the {n:,} indexed tokens"
        return (
            f"{token.strip()!r} occurs {seen:,} times in the {n:,} indexed tokens, but is "
            "not among any latent's most frequent top-example tokens"
        )

    def context(self, req: Request) -> dict[str, Any]:
        """A longer context around one stream position (tokens only: activations are stored for
        the example's window)."""
        from mlsae.explore.finalize import window_ids

        pos = int_arg(req, "pos", 0, max(0, len(self.db.stream) - 1), 0)
        w = int_arg(req, "w", 1, MAX_CONTEXT, 32)
        ids, at = window_ids(self.db.stream, pos, w, self.db.ctx)
        return {"pos": pos, "at": at, "tokens": self.show_ids(ids), "window": self.db.w}

    def prompt(self, req: Request) -> dict[str, Any]:
        s = self.sae_arg(req)
        text = text_arg(req, "text", 2000)
        top = max(s["layers"])
        steer_j = opt_int_arg(req, "steer", 0, s["d_sae"] - 1)
        steer = None
        if steer_j is not None:
            raw_layers = text_arg(req, "steer_layers", 400).strip()
            if raw_layers == "all":
                layers = list(s["layers"])
            else:
                try:
                    layers = [int(x) for x in raw_layers.split(",") if x.strip()]
                except ValueError:
                    raise BadRequest("steer_layers must be 'all' or layers like 3,4,5") from None
            steer = SteerRequest(
                steer_j,
                float_arg(req, "factor", -1e9, 1e9, 0.0),
                text_arg(req, "units", 10) or "raw",
                layers,
                float(self.max_act[s["sae"]][steer_j]),
                int_arg(req, "gen", 0, 32, 8),
            )
        out = self.live.prompt(
            text,
            s["sae"],
            opt_int_arg(req, "latent", 0, s["d_sae"] - 1),
            opt_int_arg(req, "layer", 0, top),
            opt_int_arg(req, "pos", 0, 10**6),
            steer,
        )
        shown = {j for j, _ in out["top_at"]} | set(out["top_prompt"]["latents"])
        shown |= set(out["at_token"]["latents"]) | {out["latent"]}
        out["dense"] = self.dense_of(s["sae"], sorted(shown))
        out["dense_share"] = self.dense
        out["steer"] = (
            None
            if steer is None
            else {
                "latent": steer.latent,
                "factor": steer.factor,
                "units": steer.units,
                "layers": steer.layers,
                "max_act": steer.max_act,
                "gen": steer.n_gen,
            }
        )
        return out

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
            lat = None if n["sae"] is None else self.db.latent(n["sae"], n["feature"])
            n["top_tokens"] = (
                [] if lat is None else [self.show_ids([t["id"]])[0] for t in lat["top_tokens"][:3]]
            )
        out.update(
            focus=g.describe(v),
            chain=g.chain(v),
            community=g.community_info(int(g.community[v])),
            summary=g.summary(),
        )
        return out


def by_position(examples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Top examples over all layers, one per token position (its best layer's window), largest
    first, each with `fires`: layer -> activation at the layers where that position is among the
    latent's top examples."""
    rows: dict[int, dict[str, Any]] = {}
    for e in examples:  # largest first
        r = rows.get(e["pos"])
        if r is None:
            r = rows[e["pos"]] = {**e, "fires": {}}
        r["fires"][str(e["layer"])] = e["act"]
    return list(rows.values())[:limit]


def create_app(
    run: str | Path,
    db: str | Path | None = None,
    model: str | None = None,
    evolution: str | Path | None = None,
    max_tokens: int = 128,
    dtype: str = "float32",
    host: str = "127.0.0.1",
    dense: float = 0.1,
) -> Starlette:
    """The ASGI app of `mlsae explore` (the index defaults to RUN/explore.sqlite). `host`: the
    address it is bound to; requests naming another host are refused (DNS rebinding)."""
    from mlsae.explore.index import DB_NAME

    run = Path(run)
    path = Path(db) if db is not None else (run if run.is_dir() else run.parent) / DB_NAME
    ex = Explorer(
        run, path, model, Path(evolution) if evolution else None, max_tokens, dtype, dense
    )
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
        return Response(
            _asset(folder, name),
            media_type=media,
            headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"},
        )

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/favicon.ico", lambda req: Response(status_code=204)),
        Route("/api/info", api(ex.info)),
        Route("/api/latent", api(ex.latent)),
        Route("/api/search", api(ex.search)),
        Route("/api/prompt", api(ex.prompt)),
        Route("/api/graph", api(ex.graph_feature)),
        Route("/api/context", api(ex.context)),
    ]
    guard = Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))
    app = Starlette(routes=routes, middleware=[guard])
    app.state.explorer = ex
    return app


def check_startup(ex: Explorer, run: Path, index: Path, model: str | None) -> None:
    """Before serving: the SAEs in RUN are the ones indexed, the model (if any) is there, and
    --max-tokens fits its positions."""
    from mlsae.data.model import model_positions as positions  # None: its config does not say
    from mlsae.explore.source import check_served_saes, run_saes

    check_served_saes(run_saes(run), ex.db.sae_sha256, index)
    name = model or ex.db.meta["model"]  # None: no model, no prompt page (Live says why)
    n_pos = positions(name) if name is not None else None
    if n_pos is not None and ex.live.max_tokens > n_pos - 1:  # a BOS may be prepended
        log.warning(
            f"--max-tokens {ex.live.max_tokens} does not fit the model's {n_pos} "
            f"positions: prompts are capped at {n_pos - 1} tokens"
        )
        ex.live.max_tokens = n_pos - 1
