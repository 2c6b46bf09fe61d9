"""Where the explorer gets its SAEs and its tokens: the one place that reads a run folder and
the one place that reads activations (a cache in stream order, or the model run live), so that
switching to the project's run-folder object and activation-source interface is one edit each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.config import DataConfig
from mlsae.core.errors import MlsaeError


@dataclass
class RunSae:
    """One SAE of a run folder."""

    label: str  # 'MLSAE', 'L5', 'layer_05', 'sae_R8_k32', ...
    path: Path
    sae: Any  # SparseAutoencoder
    layers: list[int]  # block indices it reads, sorted


@dataclass
class Chunk:
    """Consecutive tokens of the stream with the activations of the requested layers."""

    acts: Tensor  # [n, L, d] any float dtype, model space (or lens space for a lens cache)
    token_ids: Tensor  # [n] int64
    mask: Tensor  # [n] bool, False at special tokens
    offset: int  # stream position of token 0


def run_saes(run: str | Path) -> list[RunSae]:
    """Every SAE of a run folder: an SAE folder, a run with sae/, a sweep (one per member) or a
    per-layer set (per_layer.json or layer_XX/ folders), in a stable order."""
    from mlsae.eval.evaluate import sae_dirs
    from mlsae.evolution.codes import load_per_layer
    from mlsae.sae.autoencoder import load_sae

    run = Path(run)
    if not run.exists():
        raise MlsaeError(f"run folder {str(run)!r} does not exist")
    if (run / "per_layer.json").is_file():
        return [RunSae(f"layer_{ly:02d}", run, sae, [ly]) for ly, sae in load_per_layer(run)]
    out = []
    for d in sae_dirs(run):
        sae = load_sae(d)
        layers = sorted(int(x) for x in sae.cfg.layers)
        if not layers:
            raise MlsaeError(f"{d}: the SAE lists no layers")
        label = d.name if d.name != "sae" else ("MLSAE" if len(layers) > 1 else f"L{layers[0]}")
        out.append(RunSae(label, d, sae, layers))
    return out


def cache_chunks(cache: Any, layers: list[int], max_tokens: int | None) -> Iterator[Chunk]:
    """Chunks of an ActivationCache in stream order (whole shards, up to max_tokens rounded up
    to whole contexts), with the columns of `layers`."""
    missing = [ly for ly in layers if ly not in cache.layers]
    if missing:
        raise MlsaeError(f"cache {cache.path} lacks layer(s) {missing} (it holds {cache.layers})")
    cols = [cache.layers.index(ly) for ly in layers]
    ctx = int(cache.context_length or 1)
    left = math.inf if max_tokens is None else math.ceil(max_tokens / ctx) * ctx
    for s in cache.iter_ordered():
        if left <= 0:
            return
        n = int(min(len(s.token_ids), left))
        left -= n
        yield Chunk(s.activations[:n, cols], s.token_ids[:n], s.mask[:n], s.offset)


def live_chunks(
    lm: Any, data: DataConfig, layers: list[int], n_tokens: int, batch_size: int = 4
) -> Iterator[Chunk]:
    """Chunks from running the loaded model (LoadedModel) on the first ceil(n_tokens /
    context_length) contexts of a dataset split, `batch_size` contexts per forward pass."""
    from mlsae.data.capture import capture, used_mask
    from mlsae.data.text import iter_contexts

    ctx = int(data.context_length)
    n_ctx = max(1, math.ceil(n_tokens / ctx))
    contexts = iter_contexts(lm.tokenizer, data)
    done = 0
    while done < n_ctx:
        batch = [c for _, c in zip(range(min(batch_size, n_ctx - done)), contexts, strict=False)]
        if not batch:
            return
        ids = torch.stack(batch)  # [B, T]
        h = capture(lm.model, ids, layers)  # [B, T, L, d]
        yield Chunk(h.flatten(0, 1), ids.flatten(), used_mask(ids, lm.special_ids).flatten(),
                    done * ctx)  # fmt: skip
        done += len(batch)
