"""Token streams and the code store of `mlsae evolution` (see mlsae.evolution.run).

A stream is an iterator of `Chunk`s, consecutive tokens with every SAE layer's activations,
read from an activation cache in stream order or produced by running the model on a dataset
split. `CodeStore` keeps each layer's TopK codes on disk between pass 1 and pass 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mlsae.core.config import DataConfig, ModelConfig
from mlsae.core.errors import MlsaeError


@dataclass
class Chunk:
    """Consecutive tokens of the stream: activations of the SAE layers, in the SAEs' order."""

    acts: Tensor  # [n, L, d] any float dtype
    token_ids: Tensor  # [n]
    mask: Tensor  # [n] bool, False at special tokens
    offset: int  # stream position of token 0


def load_per_layer(run: Path) -> list[tuple[int, Any]]:
    """The single-layer SAEs of a per-layer run folder (those listed in per_layer.json, else
    every sub-folder with cfg.json), sorted by layer: [(layer, SparseAutoencoder)]."""
    from mlsae.sae.autoencoder import load_sae

    run = Path(run)
    if not run.is_dir():
        raise MlsaeError(f"run folder {str(run)!r} does not exist")
    listing = run / "per_layer.json"
    if listing.is_file():
        try:
            folders = [run / e["path"] for e in json.loads(listing.read_text())["saes"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MlsaeError(f"{listing}: unreadable per-layer listing ({e})") from None
    else:
        folders = [c.parent for c in sorted(run.glob("*/cfg.json"))]
    out = []
    for folder in folders:
        sae = load_sae(folder)
        if len(sae.cfg.layers) != 1:
            raise MlsaeError(f"{folder} is not a single-layer SAE (layers {sae.cfg.layers})")
        out.append((int(sae.cfg.layers[0]), sae))
    out.sort(key=lambda t: t[0])
    layers = [ly for ly, _ in out]
    if len(set(layers)) != len(layers):
        raise MlsaeError(f"{run} holds two SAEs for one layer (layers {layers})")
    if len(out) < 2:
        raise MlsaeError(
            f"{run} holds {len(out)} single-layer SAE(s); need a per-layer set of at least two "
            "(`mlsae train --per-layer`)"
        )
    return out


def cache_chunks(path: Path, saes: list[tuple[int, Any]]) -> tuple[Iterator[Chunk], dict]:
    """Chunks from an activation cache, checked against the SAEs; and the cache's facts."""
    from mlsae.activations.cache import ActivationCache

    cache = ActivationCache(path)
    missing = [ly for ly, _ in saes if ly not in cache.layers]
    if missing:
        raise MlsaeError(f"cache {path} lacks layer(s) {missing} (it holds {cache.layers})")
    for ly, sae in saes:
        if sae.cfg.d_in != cache.d_model:
            raise MlsaeError(
                f"SAE of layer {ly} has d_in {sae.cfg.d_in}, cache d_model {cache.d_model}"
            )
    cols = [cache.layers.index(ly) for ly, _ in saes]

    def gen() -> Iterator[Chunk]:
        for s in cache.iter_ordered():
            yield Chunk(s.activations[:, cols], s.token_ids, s.mask, s.offset)

    facts = {"n_tokens": cache.n_tokens, "context_length": int(cache.context_length),
             "model": cache.manifest.get("model"), "source": str(path),
             "lens": cache.manifest.get("lens")}  # fmt: skip
    return gen(), facts


def model_chunks(
    model_cfg: ModelConfig, data_cfg: DataConfig, saes: list[tuple[int, Any]], n_tokens: int,
    batch_size: int,
) -> tuple[Iterator[Chunk], dict, Any]:  # fmt: skip
    """Chunks from running the model on `n_tokens` of a dataset split; and the tokenizer."""
    from mlsae.data.capture import capture, check_layers, used_mask
    from mlsae.data.model import load_model
    from mlsae.data.text import iter_contexts

    lm = load_model(model_cfg)
    layers = check_layers([ly for ly, _ in saes], lm.n_layers)
    ctx = int(data_cfg.context_length)
    n_ctx = max(1, -(-int(n_tokens) // ctx))

    def gen() -> Iterator[Chunk]:
        contexts = iter_contexts(lm.tokenizer, data_cfg)
        done = 0
        while done < n_ctx:
            batch = [
                c for _, c in zip(range(min(batch_size, n_ctx - done)), contexts, strict=False)
            ]
            if not batch:
                break
            ids = torch.stack(batch)  # [B, T]
            h = capture(lm.model, ids, layers)  # [B, T, L, d]
            mask = used_mask(ids, lm.special_ids)
            yield Chunk(h.flatten(0, 1), ids.flatten(), mask.flatten(), done * ctx)
            done += len(batch)

    facts = {"n_tokens": n_ctx * ctx, "context_length": ctx, "model": model_cfg.model,
             "source": f"{data_cfg.dataset}:{data_cfg.split}"}  # fmt: skip
    return gen(), facts, lm.tokenizer


class CodeStore:
    """Append-only files of every layer's TopK codes (int32 indices, float32 values) and of the
    stream's token ids; read back by row range."""

    def __init__(self, folder: Path, n_layers: int) -> None:
        self.folder = folder
        self.files = [
            (open(folder / f"idx_{p}.bin", "wb"), open(folder / f"act_{p}.bin", "wb"))  # noqa: SIM115 (closed in close())
            for p in range(n_layers)
        ]
        self.tok = open(folder / "tokens.bin", "wb")  # noqa: SIM115
        self.k = [0] * n_layers
        self.rows = [0] * n_layers
        self.n_stream = 0

    def add_tokens(self, token_ids: Tensor, offset: int) -> None:
        if offset != self.n_stream:
            raise MlsaeError(
                f"token stream is not contiguous (offset {offset}, expected {self.n_stream})"
            )
        token_ids.to(torch.int32).numpy().tofile(self.tok)
        self.n_stream += len(token_ids)

    def add(self, p: int, idx: Tensor, acts: Tensor) -> None:
        self.k[p] = idx.shape[1]
        idx.to(torch.int32).numpy().tofile(self.files[p][0])
        acts.float().numpy().tofile(self.files[p][1])
        self.rows[p] += idx.shape[0]

    def close(self) -> None:
        for a, b in self.files:
            a.close()
            b.close()
        self.tok.close()

    def read(self, p: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        k = self.k[p]
        idx = np.fromfile(
            self.folder / f"idx_{p}.bin", np.int32, (stop - start) * k, offset=start * k * 4
        )
        act = np.fromfile(
            self.folder / f"act_{p}.bin", np.float32, (stop - start) * k, offset=start * k * 4
        )
        return torch.from_numpy(idx.astype(np.int64)).view(-1, k), torch.from_numpy(act).view(-1, k)

    def tokens(self) -> np.ndarray:
        return np.fromfile(self.folder / "tokens.bin", np.int32)
