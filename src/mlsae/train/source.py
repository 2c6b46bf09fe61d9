"""The activations a training run reads: an activation cache (`--cache`), or the model run live
on the training split (no `--cache`): the live stream is read through the same shuffle buffer
as a cache of the same settings (`mlsae.activations.source.ActivationSource.shuffled`), so the
run writes nothing but its own folder, and training on the stream equals training on
`mlsae cache --shard-tokens S` of the same tokens (same seed). The stream's settings are saved
in the RunConfig (`source`, `data`, `model`, `stream`), so `--resume` reopens the identical
stream and skips to the checkpoint's batch without running the model on the batches before.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mlsae.activations.source import ActivationSource
from mlsae.core.config import (
    DataConfig,
    ExtractConfig,
    ModelConfig,
    RunConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.sae.folders import RUN_CFG
from mlsae.train.run import check_new_run, plan_run, read_run

DEFAULT_TOKENS = 50_000
"""Training tokens read from the model when --tokens is not given."""


def open_stream(
    data: DataConfig,
    model: ModelConfig,
    source: SourceConfig,
    stream: ExtractConfig,
    layers: list[int] | str | None,
) -> ActivationSource:
    """The live training stream: `model` on `source.tokens` tokens of the train split of
    `data`, blocks of `stream.shard_tokens` tokens stored in `stream.storage_dtype`."""
    from mlsae.activations.open import open_live

    fixed = [int(x) for x in layers] if isinstance(layers, list) else None
    spec = layers if isinstance(layers, str) else None
    return open_live(
        replace(source, cache=None, layers=spec), replace(data, split="train"), model,
        default_tokens=source.tokens or DEFAULT_TOKENS, layers=fixed,
        storage_dtype=stream.storage_dtype, block_tokens=stream.shard_tokens,
    )  # fmt: skip


def open_run_source(run: RunConfig) -> ActivationSource:
    """The activations of an existing run: its cache, or its live stream reopened."""
    if run.cache is not None:
        from mlsae.activations.cache import ActivationCache

        return ActivationCache(run.cache)
    if run.stream is None:
        raise MlsaeError(f"{RUN_CFG} names no activation cache nor live stream: cannot resume")
    return open_stream(run.data, run.model, run.source, run.stream, list(run.layers))


def prepare_run(
    out: Path,
    *,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
    sae: SaeGridConfig | None = None,
    train: TrainConfig | None = None,
    stream: ExtractConfig | None = None,
    resume: bool = False,
    train_given: dict[str, object] | None = None,
    device: str | None = None,
) -> tuple[RunConfig, ActivationSource]:
    """The RunConfig (written to RUN/train_cfg.json) and activations of a new run, or of the
    run in `out` (resume: `train_given` max_steps / epochs may be raised, `device` may move it).
    Every option is checked before the folder is made."""
    if resume:
        run = read_run(out, train_given)
        if device is not None and device != run.model.device:
            run.model = replace(run.model, device=device)
            write_json(out / RUN_CFG, run.to_dict())
        return run, open_run_source(run)
    data, model = data or DataConfig(), model or ModelConfig()
    source, sae = source or SourceConfig(), sae or SaeGridConfig()
    train, stream = train or TrainConfig(), stream or ExtractConfig()
    check_new_run(out)
    if sae.lens is not None:  # a bad lens fails before any work
        from mlsae.lens.tuned import load_lens

        load_lens(sae.lens)
    if source.cache is not None:
        from mlsae.activations.cache import ActivationCache

        src: ActivationSource = ActivationCache(source.cache)
        run = plan_run(src, data, model, source, sae, train)
    else:
        source = replace(source, tokens=source.tokens or DEFAULT_TOKENS)
        layers = str(sae.single_layer) if sae.single_layer is not None else source.layers
        src = open_stream(data, model, source, stream, layers)
        run = plan_run(src, replace(data, split="train"), model, source, sae, train)
        run.stream = stream
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_CFG, run.to_dict())
    return run, src
