"""Token streams and the code store of `mlsae evolution` (see mlsae.evolution.run).

A stream is an iterator of `Chunk`s, consecutive tokens with every SAE layer's activations,
read from an activation cache in stream order or produced by running the model on a dataset
split. `CodeStore` keeps each layer's TopK codes on disk between pass 1 and pass 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource
from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import EncoderOutput, SparseAutoencoder
from mlsae.sae.folders import RunFolder


@dataclass
class Chunk:
    """Consecutive tokens of the stream: activations of the SAE layers, in the SAEs' order."""

    acts: Tensor  # [n, L, d] any float dtype
    token_ids: Tensor  # [n]
    mask: Tensor  # [n] bool, False at special tokens
    offset: int  # stream position of token 0


def comparable_acts(enc: EncoderOutput, rescale: bool = True) -> Tensor:
    """The activations [n, k] the cross-layer statistics use: with `rescale`, each latent's
    activation times its vector's scale (`enc.std`, ones without per-vector normalisation), so
    it is the latent's contribution in the raw space, comparable across layers; otherwise the
    SAE's own (per-vector standardised) activations, which move with the vector's std."""
    return enc.top_acts * enc.std if rescale else enc.top_acts


def load_per_layer(run: Path) -> list[tuple[int, SparseAutoencoder]]:
    """The single-layer SAEs of a per-layer run folder, sorted by layer: [(layer, SAE)]."""
    from mlsae.sae.folders import load_sae

    folder = RunFolder(Path(run))
    out = [(ly, load_sae(d)) for ly, d in folder.per_layer_dirs()]
    if len(out) < 2:
        raise MlsaeError(
            f"{run} holds {len(out)} single-layer SAE(s); need a per-layer set of at least two "
            "(`mlsae train --per-layer`)"
        )
    return out


def source_chunks(
    source: ActivationSource,
    saes: list[tuple[int, SparseAutoencoder]],
    max_tokens: int | None = None,
) -> tuple[Iterator[Chunk], dict[str, Any]]:
    """Chunks of the SAEs' layers from an activation source in stream order, checked against
    the SAEs; and the source's facts for evolution.json."""
    missing = [ly for ly, _ in saes if ly not in source.layers]
    if missing:
        raise MlsaeError(f"{source.describe()} lacks layer(s) {missing} (it holds {source.layers})")
    for ly, sae in saes:
        if sae.cfg.d_in != source.d_model:
            raise MlsaeError(
                f"SAE of layer {ly} has d_in {sae.cfg.d_in}, the activations {source.d_model}"
            )
    cols = [source.layers.index(ly) for ly, _ in saes]

    def gen() -> Iterator[Chunk]:
        for b in source.iter_ordered(max_tokens):
            yield Chunk(b.activations[:, cols], b.token_ids, b.mask, b.offset)

    ctx = max(1, int(source.context_length))
    n = source.n_tokens if max_tokens is None else min(source.n_tokens, -(-max_tokens // ctx) * ctx)
    path = getattr(source, "path", None)
    where = (
        str(path)
        if path is not None
        else f"{source.info.get('dataset')}:{source.info.get('split')}"
    )
    facts = {
        "n_tokens": n,
        "context_length": int(source.context_length),
        "model": source.info.get("model"),
        "source": where,
        "lens": source.lens,
    }
    return gen(), facts


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
        self.pos = open(folder / "positions.bin", "wb")  # noqa: SIM115
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

    def add_positions(self, pos: Tensor) -> None:
        """The stream positions of the used tokens whose codes follow (for their contexts)."""
        pos.to(torch.int64).numpy().tofile(self.pos)

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
        self.pos.close()

    def read(self, p: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        k = self.k[p]
        idx = np.fromfile(
            self.folder / f"idx_{p}.bin", np.int32, (stop - start) * k, offset=start * k * 4
        )
        act = np.fromfile(
            self.folder / f"act_{p}.bin", np.float32, (stop - start) * k, offset=start * k * 4
        )
        return torch.from_numpy(idx.astype(np.int64)).view(-1, k), torch.from_numpy(act).view(-1, k)

    def read_rows(self, p: int, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """Layer p's codes at the given token rows (any order), as `read`."""
        k = self.k[p]
        idx = np.memmap(self.folder / f"idx_{p}.bin", np.int32, "r", shape=(self.rows[p], k))
        act = np.memmap(self.folder / f"act_{p}.bin", np.float32, "r", shape=(self.rows[p], k))
        return torch.from_numpy(idx[rows].astype(np.int64)), torch.from_numpy(np.array(act[rows]))

    def positions(self) -> np.ndarray:
        """[rows] int64: the stream position of each stored row (used tokens)."""
        return np.fromfile(self.folder / "positions.bin", np.int64)

    def tokens(self) -> np.ndarray:
        return np.fromfile(self.folder / "tokens.bin", np.int32)
