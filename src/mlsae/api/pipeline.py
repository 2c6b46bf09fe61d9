# pyright: strict
"""The pipeline as Python calls, with the CLI's names and settings: `load_model`,
`activations`, `train` / `resume` (-> `Run`), `evaluate`, `analyze`, `evolution`,
`train_lens`, `evaluate_lens`. Settings are the CLI's own dataclasses (`mlsae.TrainConfig`,
`mlsae.SaeGridConfig`, ...: one field per option, its docstring the option's help); `cache=` is
a shortcut for `source=SourceConfig(cache=...)`. Every call runs the function behind the CLI
command of the same name, with the same checks and outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mlsae.core.config import (
    DataConfig,
    Dtype,
    ExtractConfig,
    ModelConfig,
    SaeGridConfig,
    SourceConfig,
    Split,
    TrainConfig,
)
from mlsae.core.inputs import HELD_OUT_SPLIT, HELD_OUT_TOKENS, Inputs
from mlsae.core.stage_config import AnalysisConfig, EvalConfig, EvolutionConfig, LensTrainConfig

if TYPE_CHECKING:
    from mlsae.activations.source import ActivationSource
    from mlsae.analysis.analyze import AnalysisResult
    from mlsae.api.run import Run
    from mlsae.data.model import LoadedModel
    from mlsae.eval.result import EvalResult
    from mlsae.lens.tuned import TunedLens

PathLike = str | Path


def _source(source: SourceConfig | None, cache: PathLike | None) -> SourceConfig:
    source = source or SourceConfig()
    return source if cache is None else replace(source, cache=Path(cache))


def _held_out(
    source: SourceConfig | None,
    cache: PathLike | None,
    data: DataConfig | None,
    model: ModelConfig | None,
) -> Inputs:
    """A measuring stage's inputs: `cache` as the source if given, the held-out split by
    default."""
    return Inputs.held_out(_source(source, cache), data, model)


def load_model(
    name: str = "default", *, dtype: Dtype = "float32", device: str = "cpu"
) -> LoadedModel:
    """Open a causal LM as every command does (`--model`): 'default' (SmolLM2-135M, offline), a
    Hugging Face id, a local folder or a .gguf file; in `dtype` on `device`.

    >>> lm = mlsae.load_model("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> lm.n_layers, lm.d_model  # doctest: +SKIP
    (30, 576)
    """
    from mlsae.data.model import load_model as load

    return load(ModelConfig(model=name, dtype=dtype, device=device))


def activations(
    cache: PathLike | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    split: Split = HELD_OUT_SPLIT,
    tokens: int = HELD_OUT_TOKENS,
    layers: str | None = None,
) -> ActivationSource:
    """Residual-stream vectors: an activation cache (`cache`, as `mlsae cache` writes it), or
    the model run live on `tokens` tokens of `dataset`'s `split` (nothing written). Either
    way an `ActivationSource` (`.shuffled(...)`, `.iter_ordered()`, `.layers`, `.d_model`).

    >>> src = mlsae.activations("data/cache_test")  # doctest: +SKIP
    >>> src = mlsae.activations(model="default", dataset="corpus.txt", tokens=2048)  # doctest: +SKIP
    """
    from mlsae.activations.open import open_source

    data = DataConfig(dataset=dataset, split=split)
    source = SourceConfig(
        cache=None if cache is None else Path(cache), tokens=tokens, layers=layers
    )
    return open_source(Inputs(source, data, ModelConfig(model=model)), default_tokens=tokens)


def train(
    out: PathLike,
    config: TrainConfig | None = None,
    *,
    cache: PathLike | None = None,
    sae: SaeGridConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
    stream: ExtractConfig | None = None,
) -> Run:
    """`mlsae train --out OUT`: a new run (the MLSAE by default; `sae` selects a single layer,
    a sweep or a per-layer set) on `cache`, or on the model live (`source.tokens` tokens of
    `data`) without one. Checkpoints, exact resume, metrics.jsonl and final_fvu.json as the
    CLI writes them. Returns the finished `Run`.

    >>> run = mlsae.train("runs/demo", mlsae.TrainConfig(max_steps=200), cache="cache",
    ...                   sae=mlsae.SaeGridConfig(expansion_factor=[8], k=[16]))  # doctest: +SKIP
    >>> run.sae.cfg.d_sae  # doctest: +SKIP
    4608
    """
    from mlsae.api.run import Run
    from mlsae.train.loop import train_command

    inputs = Inputs(_source(source, cache), data or DataConfig(), model or ModelConfig())
    folder = train_command(
        Path(out),
        inputs=inputs,
        sae=sae,
        train=config,
        stream=stream,
    )
    return Run(folder)


def resume(
    run: PathLike,
    *,
    max_steps: int | None = None,
    epochs: int | None = None,
    device: str | None = None,
) -> Run:
    """`mlsae train --resume RUN`: continue a run exactly from its last checkpoint (its saved
    settings; only `max_steps` and `epochs` may be raised, `device` changed)."""
    from mlsae.api.run import Run
    from mlsae.train.loop import train_command

    given: dict[str, object] = {}
    if max_steps is not None:
        given["max_steps"] = max_steps
    if epochs is not None:
        given["epochs"] = epochs
    folder = train_command(Path(run), resume=True, train_given=given, device=device)
    return Run(folder)


def evaluate(
    run: PathLike,
    out: PathLike,
    *,
    cache: PathLike | None = None,
    config: EvalConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
    lens: PathLike | None = None,
) -> EvalResult:
    """`mlsae evaluate RUN --out OUT.json`: FVU, delta CE, dead and dense latents per layer on
    held-out tokens (`cache`, else the model on the test split); written to `out`. Returns the
    typed result: `.per_layer`, `.mean`, `.intervals`, `.table()`, `.to_pandas()`.

    >>> res = mlsae.evaluate("runs/demo", "runs/demo/eval.json", cache="cache_test")  # doctest: +SKIP
    """
    from mlsae.eval.evaluate import evaluate_command

    return evaluate_command(
        Path(run),
        Path(out),
        inputs=_held_out(source, cache, data, model),
        ev=config,
        lens=None if lens is None else Path(lens),
    )


def analyze(
    run: PathLike,
    out: PathLike,
    *,
    cache: PathLike | None = None,
    prompts: list[str] | None = None,
    compare: list[PathLike] | None = None,
    config: AnalysisConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
    evolution: PathLike | None = None,
    lens: PathLike | None = None,
) -> AnalysisResult:
    """`mlsae analyze RUN --out DIR`: where the latents live across layers (SPEC 4), residual
    geometry, per-prompt heatmaps of `prompts`, and DIR/report.html. Returns the typed result:
    `.summary` (analysis.json as an `AnalysisSummary`), `.table()`, `.to_pandas()`, and the
    statistics the figures are drawn from (`.stats`: per-latent arrays).

    >>> mlsae.analyze("runs/demo", "runs/demo/analysis", cache="cache_test",
    ...               prompts=["The cat sat on the mat."])  # doctest: +SKIP
    """
    from mlsae.report.analyze import analyze_command

    return analyze_command(
        Path(run),
        Path(out),
        inputs=_held_out(source, cache, data, model),
        prompts=prompts,
        compare=[Path(c) for c in compare or []],
        evolution=None if evolution is None else Path(evolution),
        lens=None if lens is None else Path(lens),
        cfg=config,
    )


def evolution(
    run: PathLike,
    out: PathLike,
    *,
    cache: PathLike | None = None,
    config: EvolutionConfig | None = None,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
):  # the evolution command's result (see mlsae.evolution.run)
    """`mlsae evolution RUN --out DIR`: features across the layers of a per-layer set
    (`train(..., sae=SaeGridConfig(per_layer=True))`): statistics, graph, SAE Match, figures.

    >>> mlsae.evolution("runs/per_layer", "runs/per_layer/evolution", cache="cache_test")  # doctest: +SKIP
    """
    from mlsae.evolution.run import evolution_command
    from mlsae.report.evolution import write_figures

    return evolution_command(
        Path(run),
        Path(out),
        inputs=_held_out(source, cache, data, model),
        cfg=config,
        figures=write_figures,
    )


def train_lens(
    out: PathLike,
    config: LensTrainConfig | None = None,
    *,
    model: str | None = None,
    dataset: str | None = None,
    tokens: int = 16384,
) -> TunedLens:
    """`mlsae lens train --out DIR`: a tuned lens (one translator per block but the last) on
    `tokens` training tokens of `dataset` through `model`; an SAE trained with `--lens DIR`
    then lives in its space.

    >>> lens = mlsae.train_lens("lens", dataset="corpus.txt", tokens=4096)  # doctest: +SKIP
    """
    from mlsae.activations.open import open_live
    from mlsae.core.outputs import check_output
    from mlsae.lens.command import train_lens_command

    check_output(Path(out), "lens")
    data = DataConfig(dataset=dataset, split="train")
    live = open_live(
        Inputs(SourceConfig(tokens=tokens), data, ModelConfig(model=model, device="cpu")),
        default_tokens=tokens,
    )
    return train_lens_command(Path(out), live, config)


def evaluate_lens(
    lens: PathLike,
    out: PathLike,
    *,
    model: str | None = None,
    dataset: str | None = None,
    tokens: int = 2048,
):  # the lens evaluation (see mlsae.lens.evaluate)
    """`mlsae lens evaluate LENS --out OUT.json`: per-layer KL and CE of the tuned lens vs the
    logit lens on `tokens` held-out tokens.

    >>> mlsae.evaluate_lens("lens", "lens_eval.json", dataset="corpus.txt")  # doctest: +SKIP
    """
    from mlsae.activations.open import open_live
    from mlsae.core.errors import MlsaeError
    from mlsae.core.outputs import check_output
    from mlsae.lens.evaluate import evaluate_lens_command
    from mlsae.lens.tuned import load_lens

    check_output(Path(out), "eval", file=True, inputs=[Path(lens)])
    tl = load_lens(lens)
    tl.meta["path"] = str(lens)
    name = model or tl.model_name
    if not name:
        raise MlsaeError("the lens does not name its model: pass model=")
    data = DataConfig(dataset=dataset, split="test")
    live = open_live(
        Inputs(SourceConfig(tokens=tokens), data, ModelConfig(model=name, device="cpu")),
        default_tokens=tokens,
        layers=[],
    )
    return evaluate_lens_command(tl, Path(out), live, SourceConfig().batch_size)
