"""`mlsae analyze`: run the SPEC 4 analysis of a trained SAE and write DIR/analysis.json,
DIR/latents.npz, the PNG figures and DIR/report.html (one self-contained file: images are
base64 data URIs, no external links or scripts).

Which layers: an MLSAE is applied to the layers it was trained on; a single-layer SAE is applied
to every layer of the cache (as the paper does), and a `--compare` SAE to the same layers as the
main one, so the two analyses share tokens and layers.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.analysis.geometry import GeometryResult
from mlsae.analysis.layers import LayerStatsResult, analyze_cache, analyze_prompts, sae_encoder
from mlsae.core.config import DataConfig, ModelConfig, SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json, write_json
from mlsae.report.html import write_report

log = logging.getLogger(__name__)

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
    """An optional JSON file (an evaluation, a config): None if absent or unreadable."""
    try:
        return read_json(path)
    except MlsaeError:
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
    from mlsae.sae.autoencoder import load_sae

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
    compare: Path | list[Path] | None = None,
    chunk_vectors: int = 8192,
    evolution: Path | None = None,
    lens: Path | None = None,
    paper_batch_tokens: int = 2048,
) -> dict[str, Any]:
    """The whole `mlsae analyze`; returns the analysis.json dict. `compare`: other SAE runs
    analysed on the same tokens and layers (e.g. a single-layer SAE, or the same MLSAE trained
    with(out) a tuned lens: a lens SAE reads T_l(x), applied on the fly to a plain cache).
    `lens`: the main SAE's lens folder if it has moved. `paper_batch_tokens`: batch of the paper
    code's variance ratios (paper_formula in analysis.json). `evolution`: an `mlsae evolution`
    output folder whose section (and graph.html link) joins the report."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.activations.extract import build_cache
    from mlsae.lens.tuned import resolve_space

    run, out = Path(run), Path(out)
    prompts = list(prompts or [])
    compares = [] if compare is None else [compare] if isinstance(compare, Path) else compare
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a folder")
    sae_dir = resolve_sae_dir(run)
    sae, cfg = _load(sae_dir)
    resolve_space(cfg.lens, None, override=lens, sae_dir=sae_dir)  # lens errors before work
    extra: list[str] = []
    if evolution is not None:
        import os

        from mlsae.report.evolution import evolution_section_html

        href = os.path.relpath(Path(evolution).resolve() / "graph.html", out.resolve())
        extra.append(evolution_section_html(Path(evolution), graph_href=href))
    cmps = []
    for c in compares:
        cmp_dir = resolve_sae_dir(Path(c))
        cmp_sae, cmp_cfg = _load(cmp_dir)
        if cmp_cfg.d_in != cfg.d_in:
            raise MlsaeError(
                f"--compare SAE {cmp_dir} has d_in {cmp_cfg.d_in}, the run's SAE {cfg.d_in}"
            )
        cmps.append((cmp_dir, cmp_sae, cmp_cfg))
    out.mkdir(parents=True, exist_ok=True)
    tmp_cache: Path | None = None
    try:
        if cache is None:  # model-space vectors; lens SAEs get T_l applied on the fly
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
            )
            cache = tmp_cache
        ac = ActivationCache(cache)
        if ac.d_model != cfg.d_in:
            raise MlsaeError(f"the cache has d_model {ac.d_model}, the SAE d_in {cfg.d_in}")
        cache_lens = ac.manifest.get("lens")
        space = resolve_space(cfg.lens, cache_lens, override=lens, sae_dir=sae_dir)
        spaces = [
            resolve_space(c.lens, cache_lens, sae_dir=d, what=f"--compare SAE {d}")
            for d, _, c in cmps
        ]
        if str(ac.manifest.get("model")) != str(cfg.model):
            _warn(f"cache model {ac.manifest.get('model')!r} != SAE model {cfg.model!r}")
        if ac.manifest.get("split") == "train":
            _warn(
                "the cache holds training-split tokens: held-out tokens (--split test) are fairer"
            )
        layers = list(cfg.layers) if len(cfg.layers) > 1 else list(ac.layers)
        prompt_stats = analyze_prompts(
            prompts, model or cfg.model, sae, cfg, layers, chunk_vectors, space.lens
        )
        encoders = {"main": (sae_encoder(sae, _on_the_fly(space), layers), cfg.d_sae)}
        for i, ((_, c_sae, c_cfg), sp) in enumerate(zip(cmps, spaces, strict=True)):
            encoders[f"compare_{i}"] = (sae_encoder(c_sae, _on_the_fly(sp), layers), c_cfg.d_sae)
        results, geo = analyze_cache(
            ac, encoders, layers, chunk_vectors, paper_batch_tokens=paper_batch_tokens
        )
        cache_info = {k: ac.manifest.get(k) for k in ("model", "dataset", "split", "lens")}
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    stats = results["main"]
    summary = _summary(stats, geo)
    summary.update(
        run=str(run),
        sae=str(sae_dir),
        space=_space_name(cfg),
        cache=None if tmp_cache is not None else str(cache),
        data=cache_info,
        sae_cfg=cfg.to_dict(),
        prompts=[
            {"text": t, **_summary(s, None)} for t, s in zip(prompts, prompt_stats, strict=True)
        ],
        compare=[
            {
                "sae": str(d),
                "label": _label(d),
                "space": _space_name(c),
                "sae_cfg": c.to_dict(),
                **_summary(results[f"compare_{i}"], None),
            }
            for i, (d, _, c) in enumerate(cmps)
        ],  # fmt: skip
    )
    from mlsae.report.figures import make_figures

    figs = make_figures(
        out,
        stats,
        geo,
        list(zip(prompts, prompt_stats, strict=True)),
        [(_label(d), results[f"compare_{i}"]) for i, (d, _, _) in enumerate(cmps)],
    )
    summary["figures"] = [p.name for _, p in figs]
    ev = find_eval(run, sae_dir)
    summary["eval_mean"] = ev[1].get("mean") if ev else None
    for c, cp in zip(summary["compare"], compares, strict=True):
        c_ev = find_eval(Path(cp), Path(c["sae"]))
        c["eval_mean"] = c_ev[1].get("mean") if c_ev else None
    summary["lens_eval"] = _lens_eval([cfg.lens, *(c.lens for _, _, c in cmps)])
    summary = _clean(summary)
    write_json(out / "analysis.json", summary)
    stats.save_npz(out / "latents.npz")
    configs = {"cfg.json": _read_json(sae_dir / "cfg.json")}
    for name in ("train_cfg.json",):
        for folder in (run, sae_dir):
            if (folder / name).is_file():
                configs[name] = _read_json(folder / name)
                break
    write_report(out / "report.html", summary, figs, configs, ev, extra)
    log.info(f"wrote {out / 'analysis.json'} and {out / 'report.html'}")
    return summary


def _lens_eval(lenses: list[str | None]) -> dict[str, Any] | None:
    """`mlsae lens evaluate` results saved as eval.json in the first lens folder that has one."""
    for lens in lenses:
        if lens and isinstance(obj := _read_json(Path(lens) / "eval.json"), dict):
            return {"path": lens, **obj}
    return None


def _on_the_fly(space: Any) -> Any:
    """The lens to apply to cached vectors before the SAE (None: they are its inputs)."""
    return None if space.cache_in_lens else space.lens


def _space_name(cfg: SaeConfig) -> str:
    return "tuned-lens" if cfg.lens else "model"


def _warn(msg: str) -> None:
    log.warning(f"{msg}")


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
