"""`mlsae analyze`: run the SPEC 4 analysis of a trained SAE and write DIR/analysis.json,
DIR/latents.npz, the PNG figures and DIR/report.html (one self-contained file: images are
base64 data URIs, no external links or scripts).

Which layers: an MLSAE is applied to the layers it was trained on; a single-layer SAE is applied
to every layer of the cache (as the paper does), and a `--compare` SAE to the same layers as the
main one, so the two analyses share tokens and layers.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.analysis import LayerStatsResult, analyze_cache, analyze_prompts, sae_encoder
from mlsae.config import DataConfig, ModelConfig, SaeConfig, save_json
from mlsae.errors import MlsaeError
from mlsae.geometry import GeometryResult

PAPER_TOKEN_FACTOR = (10.0, 100.0)  # "one to two orders of magnitude smaller"


# ---------------------------------------------------------------- run folders


def resolve_sae_dir(run: Path) -> Path:
    """The SAE folder of a run: RUN itself, RUN/sae, or RUN's only SAE sub-folder."""
    run = Path(run)
    if not run.is_dir():
        raise MlsaeError(f"run folder {str(run)!r} does not exist")
    for cand in (run, run / "sae"):
        if (cand / "cfg.json").is_file():
            return cand
    subs = sorted(p.parent for p in run.glob("*/cfg.json"))
    if len(subs) == 1:
        return subs[0]
    if subs:
        names = ", ".join(p.name for p in subs[:8])
        raise MlsaeError(f"{run} holds several SAEs ({names}): pass one of their folders")
    raise MlsaeError(f"{run} holds no SAE (expected cfg.json + sae.safetensors, or {run}/sae/)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def find_eval(run: Path, sae_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """RUN/eval.json, else the first *.json in RUN or the SAE folder that has `per_layer`."""
    seen: set[Path] = set()
    for p in [run / "eval.json", *sorted(run.glob("*.json")), *sorted(sae_dir.glob("*.json"))]:
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        obj = _read_json(p)
        if isinstance(obj, dict) and "per_layer" in obj:
            return p, obj
    return None


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---------------------------------------------------------------- the command


def _load(path: Path) -> tuple[Any, SaeConfig]:
    from mlsae.sae import load_sae

    sae = load_sae(path)
    return sae, sae.cfg


def analyze_command(
    run: Path,
    out: Path,
    cache: Path | None = None,
    model: str | None = None,
    dataset: str | None = None,
    split: str = "test",
    tokens: int = 8192,
    context_length: int = 256,
    prompts: list[str] | None = None,
    compare: Path | None = None,
    chunk_vectors: int = 8192,
    evolution: Path | None = None,
) -> dict[str, Any]:
    """The whole `mlsae analyze`; returns the analysis.json dict. `evolution`: an
    `mlsae evolution` output folder whose section (and graph.html link) joins the report."""
    from mlsae.cache import ActivationCache, build_cache

    run, out = Path(run), Path(out)
    prompts = list(prompts or [])
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a folder")
    sae_dir = resolve_sae_dir(run)
    sae, cfg = _load(sae_dir)
    extra: list[str] = []
    if evolution is not None:
        import os

        from mlsae.evolution_report import evolution_section_html

        href = os.path.relpath(Path(evolution).resolve() / "graph.html", out.resolve())
        extra.append(evolution_section_html(Path(evolution), graph_href=href))
    cmp = None
    if compare is not None:
        cmp_dir = resolve_sae_dir(Path(compare))
        cmp_sae, cmp_cfg = _load(cmp_dir)
        if cmp_cfg.d_in != cfg.d_in or bool(cmp_cfg.lens) != bool(cfg.lens):
            raise MlsaeError(
                f"--compare SAE (d_in {cmp_cfg.d_in}, lens {cmp_cfg.lens}) does not match the "
                f"run's SAE (d_in {cfg.d_in}, lens {cfg.lens})"
            )
        cmp = (cmp_dir, cmp_sae, cmp_cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp_cache: Path | None = None
    try:
        if cache is None:
            tmp_cache = Path(tempfile.mkdtemp(prefix=".cache_", dir=out))
            build_cache(
                out=tmp_cache,
                model_cfg=ModelConfig(model=model or cfg.model),
                data_cfg=DataConfig(
                    dataset=dataset or cfg.dataset,
                    split=split,  # type: ignore[arg-type]
                    context_length=context_length,
                ),
                n_tokens=tokens,
                layers=",".join(map(str, cfg.layers)) if len(cfg.layers) > 1 else None,
                lens=cfg.lens,
            )
            cache = tmp_cache
        ac = ActivationCache(cache)
        if ac.d_model != cfg.d_in:
            raise MlsaeError(f"the cache has d_model {ac.d_model}, the SAE d_in {cfg.d_in}")
        if bool(ac.manifest.get("lens")) != bool(cfg.lens):
            raise MlsaeError(
                "the SAE was trained in tuned-lens space and the cache is not (or the reverse): "
                "use a cache built with the same --lens"
            )
        if str(ac.manifest.get("model")) != str(cfg.model):
            _warn(f"cache model {ac.manifest.get('model')!r} != SAE model {cfg.model!r}")
        if ac.manifest.get("split") == "train":
            _warn(
                "the cache holds training-split tokens: held-out tokens (--split test) are fairer"
            )
        layers = list(cfg.layers) if len(cfg.layers) > 1 else list(ac.layers)
        prompt_stats = analyze_prompts(
            prompts, model or cfg.model, sae, cfg, layers, chunk_vectors, sae_dir
        )
        encoders = {"main": (sae_encoder(sae), cfg.d_sae)}
        if cmp is not None:
            encoders["compare"] = (sae_encoder(cmp[1]), cmp[2].d_sae)
        results, geo = analyze_cache(ac, encoders, layers, chunk_vectors)
        cache_info = {k: ac.manifest.get(k) for k in ("model", "dataset", "split", "lens")}
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    stats = results["main"]
    summary = _summary(stats, geo)
    summary.update(
        run=str(run),
        sae=str(sae_dir),
        cache=None if tmp_cache is not None else str(cache),
        data=cache_info,
        sae_cfg=cfg.to_dict(),
        prompts=[
            {"text": t, **_summary(s, None)} for t, s in zip(prompts, prompt_stats, strict=True)
        ],
        compare=None,
    )
    if cmp is not None:
        summary["compare"] = {"sae": str(cmp[0]), "label": _label(cmp[0])}
        summary["compare"]["sae_cfg"] = cmp[2].to_dict()
        summary["compare"].update(_summary(results["compare"], None))
    from mlsae.figures import make_figures

    figs = make_figures(
        out,
        stats,
        geo,
        list(zip(prompts, prompt_stats, strict=True)),
        None if cmp is None else (_label(cmp[0]), results["compare"]),
    )
    summary["figures"] = [p.name for _, p in figs]
    summary = _clean(summary)
    save_json(out / "analysis.json", summary)
    stats.save_npz(out / "latents.npz")
    ev = find_eval(run, sae_dir)
    configs = {"cfg.json": _read_json(sae_dir / "cfg.json")}
    for name in ("train_cfg.json",):
        for folder in (run, sae_dir):
            if (folder / name).is_file():
                configs[name] = _read_json(folder / name)
                break
    write_report(out / "report.html", summary, figs, configs, ev, extra)
    print(f"[mlsae] wrote {out / 'analysis.json'} and {out / 'report.html'}", file=sys.stderr)
    return summary


def _warn(msg: str) -> None:
    print(f"[mlsae] warning: {msg}", file=sys.stderr)


def _label(sae_dir: Path) -> str:
    """A short name for an SAE folder: the run's name for RUN/sae."""
    return sae_dir.parent.name if sae_dir.name == "sae" else sae_dir.name


def _summary(stats: LayerStatsResult, geo: GeometryResult | None) -> dict[str, Any]:
    s = stats.summary()
    r = stats.rel_var_token
    s["token_variance_factor"] = 1.0 / r if r and math.isfinite(r) and r > 0 else None
    if geo is not None:
        s.update(geo.summary())
    return s


# ---------------------------------------------------------------- plain-language reading


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}g}"


def reading(s: dict[str, Any], eval_mean: dict[str, Any] | None = None) -> list[str]:
    """A few sentences interpreting analysis.json (`s`) against the paper."""
    out = [
        f"{s['n_tokens']} tokens (special tokens excluded) on layers {s['layers'][0]}.."
        f"{s['layers'][-1]}; {s['n_latents_alive']} of {s['n_latents']} latents were active at "
        f"least once ({s['n_latents_dead']} never active, excluded)."
    ]
    fac, rl = s.get("token_variance_factor"), s.get("rel_var_latent")
    if fac is not None:
        lo, hi = PAPER_TOKEN_FACTOR
        verdict = (
            "in the range the paper reports (one to two orders of magnitude)"
            if lo <= fac <= hi
            else "even more than the one to two orders of magnitude the paper reports"
            if fac > hi
            else "less than the one to two orders of magnitude the paper reports"
        )
        out.append(
            f"For a single token, a latent's layer variance is {fac:.1f}x smaller than across "
            f"tokens (rel_var_token = {_f(s['rel_var_token'])}): {verdict}."
        )
    elif s.get("rel_var_token") == 0:
        out.append("For a single token every latent is active at exactly one layer.")
    if rl is not None:
        out.append(
            f"Aggregated over tokens, a latent's layer variance is {_f(rl)} of the total layer "
            f"variance (rel_var_latent): "
            + (
                "individual latents spread over many layers (more than half the total spread)."
                if rl > 0.5
                else "individual latents are concentrated on a few neighbouring layers."
            )
        )
    ma, mt = s.get("multi_layer_fraction_aggregate"), s.get("multi_layer_fraction_token")
    if ma is not None and mt is not None:
        verdict = (
            "as in the paper: multi-layer in aggregate, mostly single-layer for one token."
            if mt < 0.5 <= ma
            else "unlike the paper, most activations of a latent on one token span several layers."
            if mt >= 0.5
            else "few latents are multi-layer even in aggregate."
        )
        out.append(
            f"{100 * ma:.1f}% of active latents fire at more than one layer somewhere in the "
            f"sample, and {100 * mt:.1f}% of (token, latent) activations span more than one "
            f"layer of the same token: {verdict}"
        )
    nm = s.get("norm_mean")
    if nm and len(nm) > 1:
        steps = np.diff(np.asarray(nm, dtype=float))
        grows = nm[-1] > nm[0] and (steps > 0).mean() >= 0.5
        out.append(
            f"Mean residual norm goes from {_f(nm[0])} (block {s['layers'][0]}) to {_f(nm[-1])} "
            f"(block {s['layers'][-1]}), rising at {int((steps > 0).sum())} of {len(steps)} "
            "steps: " + ("norms grow with depth, as the paper reports." if grows
                         else "norms do not grow steadily with depth, unlike the paper.")
        )  # fmt: skip
    cos = [c for c in (s.get("adjacent_cosine") or []) if c is not None]
    if cos:
        out.append(
            f"Adjacent-layer cosine similarity of centred residual vectors ranges from "
            f"{min(cos):.3f} to {max(cos):.3f} (mean {float(np.mean(cos)):.3f})."
        )
    c = s.get("compare")
    if c and c.get("rel_var_token") is not None:
        out.append(
            f"The comparison SAE ({c.get('label', c['sae'])}, trained on layers {c['sae_cfg']['layers']})"
            f" applied to the same layers gives rel_var_latent = {_f(c.get('rel_var_latent'))} "
            f"and rel_var_token = {_f(c.get('rel_var_token'))}."
        )
    if eval_mean:
        fvu, dce = eval_mean.get("fvu"), eval_mean.get("delta_ce")
        out.append(
            f"Reconstruction (mean over layers): FVU {_f(fvu)}, delta CE {_f(dce)} "
            "(paper, Pythia-70m with R=64, k=32: 0.097 and 0.565)."
        )
    return out


# ---------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:right;font-size:13px}th{background:#f0f0f0}td.k{text-align:left}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;
font-size:14px}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}
.reading li{margin:.3em 0}"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return _f(v, 4)
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td class=k>{html.escape(str(k))}</td><td class=k>{_cell(v)}</td></tr>"
                   for k, v in d.items())  # fmt: skip
    return f"<table>{rows}</table>"


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def eval_table(ev: dict[str, Any]) -> str:
    """The evaluation JSON's per-layer metrics (dict of lists or list of dicts) and means."""
    per, layers = ev.get("per_layer"), ev.get("layers")
    if isinstance(per, dict):
        keys = [k for k, v in per.items() if isinstance(v, list)]
        n = max((len(per[k]) for k in keys), default=0)
        layers = layers if isinstance(layers, list) and len(layers) == n else list(range(n))
        rows = [[layers[i]] + [per[k][i] if i < len(per[k]) else "" for k in keys]
                for i in range(n)]  # fmt: skip
    elif isinstance(per, list) and per and all(isinstance(r, dict) for r in per):
        keys = [k for k in per[0] if k != "layer"]
        layers = layers if isinstance(layers, list) and len(layers) == len(per) else None
        rows = [[r.get("layer", layers[i] if layers else i)] + [r.get(k, "") for k in keys]
                for i, r in enumerate(per)]  # fmt: skip
    else:
        return f"<pre>{html.escape(json.dumps(ev, indent=1)[:20000])}</pre>"
    mean = ev.get("mean")
    if isinstance(mean, dict):
        rows.append(["mean"] + [mean.get(k, "") for k in keys])
    return _grid(["layer", *keys], rows)


def _ratio_table(s: dict[str, Any]) -> str:
    keys = ["n_tokens", "n_latents", "n_latents_alive", "var_layer", "mean_var_latent",
            "mean_var_token", "rel_var_latent", "rel_var_token", "token_variance_factor",
            "multi_layer_fraction_aggregate", "multi_layer_fraction_token",
            "multi_layer_fraction_token_per_latent"]  # fmt: skip
    cols = [("this SAE", s)]
    if s.get("compare"):
        cols.append((f"compare: {s['compare'].get('label')}", s["compare"]))
    cols += [(f"prompt {i + 1}", p) for i, p in enumerate(s.get("prompts") or [])]
    return _grid(["quantity", *[c for c, _ in cols]], [[k] + [d.get(k) for _, d in cols]
                                                      for k in keys])  # fmt: skip


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_report(
    path: Path,
    s: dict[str, Any],
    figs: list[tuple[str, Path]],
    configs: dict[str, Any],
    ev: tuple[Path, dict[str, Any]] | None,
    extra_sections: list[str] | None = None,
) -> Path:
    """Write the self-contained report.html atomically."""
    mean = ev[1].get("mean") if ev and isinstance(ev[1].get("mean"), dict) else None
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>mlsae analysis: {html.escape(Path(s['run']).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Where latents live: {html.escape(str(s['run']))}</h1>",
        f"<p>SAE <code>{html.escape(str(s['sae']))}</code>; data {_cell(s.get('data'))}.</p>",
        "<h2>Reading</h2><ul class=reading>",
        *[f"<li>{html.escape(t)}</li>" for t in reading(s, mean)],
        "</ul><h2>Layer statistics</h2>",
        _ratio_table(s),
    ]
    if s.get("prompts"):
        parts.append("<p>Prompts: " + "; ".join(
            f"{i + 1}: <q>{html.escape(p['text'])}</q>" for i, p in enumerate(s["prompts"])
        ) + "</p>")  # fmt: skip
    parts.append("<h2>Figures</h2>")
    for cap, p in figs:
        parts.append(f"<figure>{_img(p)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    if ev is not None:
        parts += [f"<h2>Evaluation <small>({html.escape(ev[0].name)})</small></h2>",
                  eval_table(ev[1])]  # fmt: skip
    else:
        parts.append("<h2>Evaluation</h2><p>No evaluation JSON in the run folder "
                     "(run <code>mlsae evaluate</code> to add one).</p>")  # fmt: skip
    parts += list(extra_sections or [])
    parts.append("<h2>Configuration</h2>")
    for name, cfg in configs.items():
        if isinstance(cfg, dict):
            parts += [f"<h3>{html.escape(name)}</h3>", _kv_table(cfg)]
    parts.append(
        "<h2>Definitions</h2><p>L is the block index. P(L=l|J=j) = sum_t a[t,l,j] / "
        "sum_t,l' a[t,l',j]; P(J=j) and P(T=t,J=j) are proportional to the latent's total "
        "activation (over layers and tokens, resp. over layers). rel_var_latent = "
        "E_J[Var(L|J)]/Var(L); rel_var_token = E_J,T[Var(L|J,T)]/E_J[Var(L|J)]. "
        "multi_layer_fraction_aggregate: fraction of active latents with activity at more "
        "than one layer over the sample; multi_layer_fraction_token: fraction of active "
        "(token, latent) pairs active at more than one layer of that token. Special tokens "
        "are excluded; never-active latents are excluded where undefined.</p></body></html>"
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
