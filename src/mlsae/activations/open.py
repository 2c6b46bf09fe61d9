"""`open_source`: the one place that decides where activations come from (an activation cache,
or the model run on a dataset split, optionally through a tuned lens), and `source_model`: the
model that goes with a source (for delta CE, prompts and logit effects)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mlsae.activations.live import LiveSource
from mlsae.activations.source import ActivationSource
from mlsae.core.config import ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.data.model import LoadedModel

log = logging.getLogger(__name__)


def open_live(
    inputs: Inputs,
    *,
    default_tokens: int,
    layers: Sequence[int] | None = None,
    lens: str | Path | None = None,
    storage_dtype: str = "float32",
    block_tokens: int = 4096,
) -> LiveSource:
    """`open_source` for commands that must run the model (caching, the tuned lens)."""
    if inputs.source.cache is not None:
        raise MlsaeError("this command runs the model: --cache is not an input here")
    src = open_source(
        inputs,
        default_tokens=default_tokens,
        layers=layers,
        lens=lens,
        storage_dtype=storage_dtype,
        block_tokens=block_tokens,
    )
    assert isinstance(src, LiveSource)
    return src


def open_source(
    inputs: Inputs,
    *,
    default_tokens: int,
    layers: Sequence[int] | None = None,
    lens: str | Path | None = None,
    storage_dtype: str = "float32",
    block_tokens: int = 4096,
) -> ActivationSource:
    """`inputs.source.cache` if given (its own model, data and layers; `inputs.data` /
    `inputs.model` unused), else a `LiveSource` running the model on `source.tokens or
    default_tokens` tokens of the data, capturing `layers` (default: `source.layers`, i.e. all
    blocks), through the tuned `lens` if given. Live vectors keep the model's precision (float32)
    unless `storage_dtype` says otherwise (`mlsae cache` rounds them as it stores them)."""
    source, data, model = inputs.parts()
    if source.cache is not None:
        from mlsae.activations.cache import ActivationCache

        if lens is not None:
            raise MlsaeError("--lens applies to the model's vectors: a cache holds what it holds")
        return ActivationCache(source.cache)
    from mlsae.core.layers import iter_layers_arg
    from mlsae.data.model import load_model
    from mlsae.data.text import iter_documents

    next(iter_documents(data))  # a missing dataset / column / empty split fails before the model
    tl = None
    if lens is not None:
        from mlsae.lens.tuned import load_lens

        tl = load_lens(lens)  # a bad lens folder fails before the model loads
    lm = load_model(model)
    chosen = list(layers) if layers is not None else iter_layers_arg(source.layers, lm.n_layers)
    transform, lens_name = None, None
    if tl is not None and lens is not None:
        from mlsae.lens.tuned import lens_ref

        tl.check_model(lm.n_layers, lm.d_model)
        tl.check_layers(chosen)
        transform = lambda acts: tl.forward_stack(acts, chosen)  # noqa: E731
        lens_name = lens_ref(lens)
    return LiveSource(
        lm,
        data,
        source.tokens or default_tokens,
        chosen,
        batch_size=source.batch_size,
        block_tokens=block_tokens,
        storage_dtype=storage_dtype,
        transform=transform,
        lens=lens_name,
        model_dtype=model.dtype,
    )


def source_model(source: ActivationSource, model: ModelConfig | None = None) -> LoadedModel:
    """The LoadedModel of a source: a live source's own, else `model.model` or the cache's
    model (then in the dtype the cache was made with), on `model.device`."""
    lm = source.lm if isinstance(source, LiveSource) else None
    named = model is not None and model.model is not None
    if lm is not None and not named:
        return lm
    from mlsae.data.model import load_model

    name = model.model if model is not None and named else source.info.get("model")
    if not name:
        raise MlsaeError(f"{source.describe()} does not name its model: pass --model")
    dtype = model.dtype if model is not None and named else source.info.get("model_dtype")
    device = model.device if model is not None else "auto"
    lm = load_model(ModelConfig(model=str(name), dtype=dtype or "float32", device=device))
    if lm.d_model != source.d_model:
        raise MlsaeError(f"model {name!r} has width {lm.d_model}, the activations {source.d_model}")
    return lm
