"""The `mlsae analyze` computation: layer statistics of SAEs (SPEC 4) and residual geometry over
one activation source, written as DIR/analysis.json and DIR/latents.npz (the figures and
report.html are the report stage's).

Which layers: an MLSAE is applied to the layers it was trained on; a single-layer SAE to every
layer of the source (as the paper does), and a `--compare` SAE to the same layers as the main
one, so the analyses share tokens and layers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mlsae.analysis.geometry import GeometryResult
from mlsae.analysis.layers import LayerStatsResult, analyze_source, sae_encoder
from mlsae.analysis.prompt import analyze_prompts
from mlsae.core.config import DataConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import json_safe, read_json, write_json
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import AnalysisConfig, BootstrapConfig
from mlsae.eval.result import EvalResult
from mlsae.lens.tuned import Space, TunedLens
from mlsae.sae.folders import RUN_CFG, RunFolder, label

log = logging.getLogger(__name__)


@dataclass
class AnalysisResult:
    """What `analyze` computed: the JSON summary and the statistics the figures are drawn from."""

    summary: dict[str, Any]
    stats: LayerStatsResult
    geometry: GeometryResult | None
    prompts: list[tuple[str, LayerStatsResult]] = field(default_factory=list)
    compare: list[tuple[str, LayerStatsResult]] = field(default_factory=list)
    configs: dict[str, Any] = field(default_factory=dict)
    """The SAE's cfg.json and the run's train_cfg.json, for the report."""
    eval: tuple[Path, EvalResult] | None = None
    """The run's `mlsae evaluate` output, if any."""


def summarize(stats: LayerStatsResult, geo: GeometryResult | None) -> dict[str, Any]:
    """analysis.json's numbers for one SAE (and the geometry)."""
    s = stats.summary()
    r = stats.rel_var_token
    s["token_variance_factor"] = 1.0 / r if r and math.isfinite(r) and r > 0 else None
    if geo is not None:
        s.update(geo.summary())
    return s


def _read_eval(found: tuple[Path, dict[str, Any]] | None) -> tuple[Path, EvalResult] | None:
    """The typed evaluation of `RunFolder.find_eval`'s file (None, with a warning, if it does
    not read as one)."""
    if found is None:
        return None
    try:
        return found[0], EvalResult.from_json(found[1], str(found[0]))
    except MlsaeError as e:
        log.warning(f"{e}: the evaluation is left out of the report")
        return None


def _space_name(cfg: SaeConfig) -> str:
    return "tuned-lens" if cfg.lens else "model"


def _lens_eval(lenses: list[str | None]) -> dict[str, Any] | None:
    """`mlsae lens evaluate` results saved as eval.json in the first lens folder that has one."""
    for lens in lenses:
        if lens and (Path(lens) / "eval.json").is_file():
            try:
                obj = read_json(Path(lens) / "eval.json")
            except MlsaeError:
                continue
            if isinstance(obj, dict):
                return {"path": lens, **obj}
    return None


def _on_the_fly(space: Space) -> TunedLens | None:
    """The lens to apply to stored vectors before the SAE (None: they are its inputs)."""
    return None if space.cache_in_lens else space.lens


def analyze(
    run: Path,
    out: Path,
    *,
    source: SourceConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    prompts: list[str] | None = None,
    compare: list[Path] | None = None,
    lens: Path | None = None,
    settings: AnalysisConfig | None = None,
    chunk_vectors: int = 8192,
    boot: BootstrapConfig | None = None,
) -> AnalysisResult:
    """Analyse the SAE of `run` (and `compare` SAEs) on `source` (a cache, else the model, by
    default the SAE's, on 8,192 test tokens of the SAE's dataset); write analysis.json and
    latents.npz into `out`. `lens`: the main SAE's lens folder if it has moved."""
    from mlsae.activations.open import open_source
    from mlsae.core.compute import resolve_device
    from mlsae.lens.tuned import resolve_space

    source, data, model = (
        source or SourceConfig(),
        data or DataConfig(split="test"),
        model or ModelConfig(),
    )
    run, out = Path(run), Path(out)
    prompts = list(prompts or [])
    check_output(out, "analysis", inputs=[run, *(compare or []), source.cache, lens])
    folder = RunFolder(run)
    sae_dir = folder.sae_dir()
    device = resolve_device(model.device)
    sae = folder.load(sae_dir).to(device)
    cfg = sae.cfg
    resolve_space(cfg.lens, None, override=lens, sae_dir=sae_dir)  # lens errors before work
    cmps = []
    for c in compare or []:
        cdir = RunFolder(Path(c)).sae_dir()
        csae = RunFolder(Path(c)).load(cdir).to(device)
        if csae.cfg.d_in != cfg.d_in:
            raise MlsaeError(
                f"--compare SAE {cdir} has d_in {csae.cfg.d_in}, the run's SAE {cfg.d_in}"
            )
        cmps.append((Path(c), cdir, csae))
    data = replace(data, dataset=data.dataset or cfg.dataset)
    model = replace(model, model=model.model or cfg.model)
    layers_wanted = list(cfg.layers) if len(cfg.layers) > 1 else None
    src = open_source(source, data, model, default_tokens=8192, layers=layers_wanted)
    if src.d_model != cfg.d_in:
        raise MlsaeError(f"the activations have d_model {src.d_model}, the SAE d_in {cfg.d_in}")
    space = resolve_space(cfg.lens, src.lens, override=lens, sae_dir=sae_dir)
    spaces = [
        resolve_space(c.cfg.lens, src.lens, sae_dir=d, what=f"--compare SAE {d}")
        for _, d, c in cmps
    ]
    if str(src.info.get("model")) != str(cfg.model):
        log.warning(f"activations of model {src.info.get('model')!r}, SAE model {cfg.model!r}")
    if src.info.get("split") == "train":
        log.warning(
            "the activations are training-split tokens: held-out ones (--split test) are fairer"
        )
    layers = list(cfg.layers) if len(cfg.layers) > 1 else list(src.layers)
    prompt_stats = analyze_prompts(prompts, model, sae, cfg, layers, chunk_vectors, space.lens,
                                   exclude_sink=data.exclude_sink)  # fmt: skip
    if (msg := cfg.sink_mismatch(src.info.get("exclude_sink"))) is not None:
        log.warning(msg)
    encoders = {"main": (sae_encoder(sae, _on_the_fly(space), layers), cfg.d_sae)}
    for i, ((_, _, c), sp) in enumerate(zip(cmps, spaces, strict=True)):
        encoders[f"compare_{i}"] = (sae_encoder(c, _on_the_fly(sp), layers), c.cfg.d_sae)
    pbt = (settings or AnalysisConfig()).paper_batch_tokens or None
    results, geo = analyze_source(src, encoders, layers, chunk_vectors, paper_batch_tokens=pbt,
                                  boot=boot or BootstrapConfig())  # fmt: skip
    stats = results["main"]
    summary = summarize(stats, geo)
    summary.update(
        run=str(run), sae=str(sae_dir), space=_space_name(cfg),
        cache=None if source.cache is None else str(source.cache),
        data={k: src.info.get(k) for k in ("model", "dataset", "split", "lens")},
        sae_cfg=cfg.to_dict(),
        prompts=[{"text": t, **summarize(s, None)} for t, s in zip(prompts, prompt_stats, strict=True)],
        compare=[
            {"sae": str(d), "label": label(d), "space": _space_name(c.cfg), "sae_cfg": c.cfg.to_dict(),
             **summarize(results[f"compare_{i}"], None)}
            for i, (_, d, c) in enumerate(cmps)
        ],
    )  # fmt: skip
    from mlsae.sae.crosscoder import CrosscoderSAE  # noqa: PLC0415 - where a crosscoder lives

    if isinstance(sae, CrosscoderSAE):  # its decoder-norm share over the layers
        summary["layer_share"] = asdict(sae.layer_share_summary())
    ev = _read_eval(folder.find_eval(sae_dir))
    summary["eval_mean"] = ev[1].to_json()["mean"] if ev else None
    for c, (crun, cdir, _) in zip(summary["compare"], cmps, strict=True):
        c_ev = RunFolder(crun).find_eval(cdir)
        c["eval_mean"] = c_ev[1].get("mean") if c_ev else None
    summary["lens_eval"] = _lens_eval([cfg.lens, *(c.cfg.lens for _, _, c in cmps)])
    summary = json_safe(summary)
    write_json(out / "analysis.json", summary)
    stats.save_npz(out / "latents.npz")
    configs: dict[str, Any] = {"cfg.json": cfg.to_dict()}
    for where in (run, sae_dir):  # shown as they are in the report
        if (where / RUN_CFG).is_file():
            try:
                configs[RUN_CFG] = read_json(where / RUN_CFG)
            except MlsaeError as e:
                log.warning(str(e))
            break
    return AnalysisResult(
        summary, stats, geo, list(zip(prompts, prompt_stats, strict=True)),
        [(label(d), results[f"compare_{i}"]) for i, (_, d, _) in enumerate(cmps)], configs, ev,
    )  # fmt: skip
