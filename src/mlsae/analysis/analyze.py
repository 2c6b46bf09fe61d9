"""The `mlsae analyze` computation: layer statistics of SAEs (SPEC 4) and residual geometry over
one activation source, written as DIR/analysis.json and DIR/latents.npz (the figures and
report.html are the report stage's).

Which layers: an MLSAE is applied to the layers it was trained on; a single-layer SAE to every
layer of the source (as the paper does), and a `--compare` SAE to the same layers as the main
one, so the analyses share tokens and layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mlsae.activations.source import ActivationSource
from mlsae.analysis.geometry import GeometryResult
from mlsae.analysis.layers import LayerStatsResult, analyze_source, sae_encoder
from mlsae.analysis.prompt import analyze_prompts
from mlsae.analysis.summary import (
    AnalysisSummary,
    CompareSummary,
    DataInfo,
    LensEval,
    PromptSummary,
)
from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import HELD_OUT_TOKENS, Inputs
from mlsae.core.io import read_json, read_json_object, write_json
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import AnalysisConfig, BootstrapConfig
from mlsae.eval.result import EvalResult
from mlsae.lens.evaluate import LensEvalResult
from mlsae.lens.tuned import Space, TunedLens
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.crosscoder import CrosscoderSAE
from mlsae.sae.folders import RUN_CFG, RunFolder, label

log = logging.getLogger(__name__)


@dataclass
class AnalysisResult:
    """What `analyze` computed: the summary (analysis.json) and the statistics the figures are
    drawn from."""

    summary: AnalysisSummary
    stats: LayerStatsResult
    geometry: GeometryResult | None
    prompts: list[tuple[str, LayerStatsResult]] = field(default_factory=list)
    compare: list[tuple[str, LayerStatsResult]] = field(default_factory=list)
    configs: dict[str, dict[str, object]] = field(default_factory=dict)
    """The SAE's cfg.json and the run's train_cfg.json as they are on disk, for the report."""
    eval: tuple[Path, EvalResult] | None = None
    """The run's `mlsae evaluate` output, if any."""

    def table(self) -> str:
        """The headline numbers as a text table (see `AnalysisSummary.table`)."""
        return self.summary.table()

    def to_pandas(self) -> Any:
        """The headline numbers as a pandas DataFrame (needs pandas)."""
        return self.summary.to_pandas()


def _read_eval(found: Path | None) -> tuple[Path, EvalResult] | None:
    """The typed evaluation of `RunFolder.find_eval`'s file (None, with a warning, if it does
    not read as one)."""
    if found is None:
        return None
    try:
        return found, EvalResult.from_json(read_json(found, "evaluation"), str(found))
    except MlsaeError as e:
        log.warning(f"{e}: the evaluation is left out of the report")
        return None


def _space_name(cfg: SaeConfig) -> str:
    return "tuned-lens" if cfg.lens else "model"


def _lens_eval(lenses: list[str | None]) -> LensEval | None:
    """`mlsae lens evaluate` results saved as eval.json in the first lens folder that has a
    readable one."""
    for lens in lenses:
        if lens and (Path(lens) / "eval.json").is_file():
            path = Path(lens) / "eval.json"
            try:
                return LensEval(lens, LensEvalResult.from_json(read_json(path), str(path)))
            except MlsaeError as e:
                log.warning(f"{e}: the lens evaluation is left out")
    return None


def _on_the_fly(space: Space) -> TunedLens | None:
    """The lens to apply to stored vectors before the SAE (None: they are its inputs)."""
    return None if space.cache_in_lens else space.lens


@dataclass
class _Compared:
    """A `--compare` SAE: its run folder, SAE folder and the SAE."""

    run: Path
    sae_dir: Path
    sae: SparseAutoencoder


def _load_compared(compare: list[Path], d_in: int, device: torch.device) -> list[_Compared]:
    out = []
    for c in compare:
        cdir = RunFolder(Path(c)).sae_dir()
        csae = RunFolder(Path(c)).load(cdir).to(device)
        if csae.cfg.d_in != d_in:
            raise MlsaeError(f"--compare SAE {cdir} has d_in {csae.cfg.d_in}, the run's SAE {d_in}")
        out.append(_Compared(Path(c), cdir, csae))
    return out


def _check_source(src: ActivationSource, cfg: SaeConfig) -> None:
    """Refuse activations of another width; warn about another model, training-split tokens
    or another attention-sink setting."""
    if src.d_model != cfg.d_in:
        raise MlsaeError(f"the activations have d_model {src.d_model}, the SAE d_in {cfg.d_in}")
    if str(src.info.get("model")) != str(cfg.model):
        log.warning(f"activations of model {src.info.get('model')!r}, SAE model {cfg.model!r}")
    if src.info.get("split") == "train":
        log.warning(
            "the activations are training-split tokens: held-out ones (--split test) are fairer"
        )
    if (msg := cfg.sink_mismatch(src.info.get("exclude_sink"))) is not None:
        log.warning(msg)


def _compare_summary(c: _Compared, stats: LayerStatsResult) -> CompareSummary:
    ev = _read_eval(RunFolder(c.run).find_eval(c.sae_dir))
    return CompareSummary.of(
        stats,
        sae=str(c.sae_dir),
        label=label(c.sae_dir),
        space=_space_name(c.sae.cfg),
        sae_cfg=c.sae.cfg,
        eval_mean=ev[1].mean if ev else None,
    )


def _configs(cfg: SaeConfig, run: Path, sae_dir: Path) -> dict[str, dict[str, object]]:
    """cfg.json and the run's train_cfg.json, shown as they are in the report."""
    configs: dict[str, dict[str, object]] = {"cfg.json": cfg.to_dict()}
    for where in (run, sae_dir):
        if (where / RUN_CFG).is_file():
            try:
                configs[RUN_CFG] = read_json_object(where / RUN_CFG)
            except MlsaeError as e:
                log.warning(str(e))
            break
    return configs


def _encoders(
    sae: SparseAutoencoder,
    space: Space,
    cmps: list[_Compared],
    cache_lens: str | None,
    layers: list[int],
) -> dict[str, Any]:
    """The main SAE's and each `--compare` SAE's encoder for the analysis pass, by name."""
    from mlsae.lens.tuned import resolve_space

    encoders = {"main": (sae_encoder(sae, _on_the_fly(space), layers), sae.cfg.d_sae)}
    for i, c in enumerate(cmps):
        sp = resolve_space(
            c.sae.cfg.lens, cache_lens, sae_dir=c.sae_dir, what=f"--compare SAE {c.sae_dir}"
        )
        encoders[f"compare_{i}"] = (sae_encoder(c.sae, _on_the_fly(sp), layers), c.sae.cfg.d_sae)
    return encoders


def analyze(
    run: Path,
    out: Path,
    *,
    inputs: Inputs | None = None,
    prompts: list[str] | None = None,
    compare: list[Path] | None = None,
    lens: Path | None = None,
    settings: AnalysisConfig | None = None,
    chunk_vectors: int = 8192,
    boot: BootstrapConfig | None = None,
) -> AnalysisResult:
    """Analyse the SAE of `run` (and `compare` SAEs) on `inputs.source` (a cache, else the
    model, by default the SAE's, on 8,192 held-out tokens of the SAE's dataset); write
    analysis.json and latents.npz into `out`. `lens`: the main SAE's lens folder if it has
    moved."""
    from mlsae.activations.open import open_source
    from mlsae.core.compute import resolve_device
    from mlsae.lens.tuned import resolve_space

    source, data, model = (inputs or Inputs.held_out()).parts()
    run, out = Path(run), Path(out)
    prompts = list(prompts or [])
    check_output(out, "analysis", inputs=[run, *(compare or []), source.cache, lens])
    folder = RunFolder(run)
    sae_dir = folder.sae_dir()
    device = resolve_device(model.device)
    sae = folder.load(sae_dir).to(device)
    cfg = sae.cfg
    resolve_space(cfg.lens, None, override=lens, sae_dir=sae_dir)  # lens errors before work
    cmps = _load_compared(list(compare or []), cfg.d_in, device)
    data = replace(data, dataset=data.dataset or cfg.dataset)
    model = replace(model, model=model.model or cfg.model)
    layers_wanted = list(cfg.layers) if len(cfg.layers) > 1 else None
    src = open_source(
        Inputs(source, data, model), default_tokens=HELD_OUT_TOKENS, layers=layers_wanted
    )
    _check_source(src, cfg)
    space = resolve_space(cfg.lens, src.lens, override=lens, sae_dir=sae_dir)
    layers = list(cfg.layers) if len(cfg.layers) > 1 else list(src.layers)
    encoders = _encoders(sae, space, cmps, src.lens, layers)
    prompt_stats = analyze_prompts(
        prompts, model, sae, cfg, layers, chunk_vectors, space.lens, exclude_sink=data.exclude_sink
    )
    pbt = (settings or AnalysisConfig()).paper_batch_tokens or None
    results, geo = analyze_source(
        src, encoders, layers, chunk_vectors, paper_batch_tokens=pbt, boot=boot or BootstrapConfig()
    )
    stats = results["main"]
    ev = _read_eval(folder.find_eval(sae_dir))
    summary = AnalysisSummary.of(
        stats,
        run=str(run),
        sae=str(sae_dir),
        space=_space_name(cfg),
        cache=None if source.cache is None else str(source.cache),
        data=DataInfo(**{k: _str(src.info.get(k)) for k in ("model", "dataset", "split", "lens")}),
        sae_cfg=cfg,
        eval_mean=ev[1].mean if ev else None,
        prompts=[PromptSummary.of_prompt(t, s) for t, s in zip(prompts, prompt_stats, strict=True)],
        compare=[_compare_summary(c, results[f"compare_{i}"]) for i, c in enumerate(cmps)],
        lens_eval=_lens_eval([cfg.lens, *(c.sae.cfg.lens for c in cmps)]),
    )
    if geo is not None:
        summary.set_geometry(geo)
    if isinstance(sae, CrosscoderSAE):  # where a crosscoder lives: its decoder-norm share
        summary.layer_share = sae.layer_share_summary()
    write_json(out / "analysis.json", summary.to_json())
    stats.save_npz(out / "latents.npz")
    return AnalysisResult(
        summary,
        stats,
        geo,
        list(zip(prompts, prompt_stats, strict=True)),
        [(label(c.sae_dir), results[f"compare_{i}"]) for i, c in enumerate(cmps)],
        _configs(cfg, run, sae_dir),
        ev,
    )


def _str(x: object) -> str | None:
    return None if x is None else str(x)
