"""Per-layer centring of a multi-layer SAE (cfg.center_layers; SPEC 2, issue 24 item 4).

The MLSAE reads the vectors of every block through one encoder and one decoder bias. When each
block's mean vector (in the standardised space the SAE sees) carries most of that block's
energy and the blocks' means point in different directions, the one shared b_dec fits the
majority of blocks and leaves the others far off (Gemma 3 270M: mean-to-deviation ratio 4-6 at
blocks 1-2, their mean directions nearly orthogonal to those of blocks 7-17). Centring subtracts
block l's mean mu_l from every standardised vector u of that block before the encoder and adds
it back to the reconstruction:

    u' = u - mu_l ;  code = encode(u') ;  u_hat = decode(code) + mu_l ;  x_hat = u_hat * s + m

mu_l is estimated from training data before training (`BlockMeans`) and saved with the SAE
(`layer_means` [L, d] in sae.safetensors, row i for block cfg.layers[i]). Since the SAE's b_dec
is subtracted before its encoder and added after its decoder, block l's SAE is exactly the
same SAE with b_dec + mu_l: exports fold it into each block's decoder bias.

Why the standardised space (after per-vector standardisation) rather than the raw vectors: the
diagnosis (the shared decoder bias cannot sit near every block's mean) is in the space where
b_dec lives, and a mean of standardised vectors is not dominated by the few outlier vectors
whose raw norm is 10-100x the median (each standardised vector has norm sqrt(d - 1)).

`auto` (`AUTO_RATIO`): centre when the largest block's ||mu_l|| / RMS deviation (the square
root of the mean squared distance of u to mu_l) is at least AUTO_RATIO."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError

AUTO_RATIO = 2.0
"""`--center-layers auto` centres when some block's ||mean|| / RMS deviation reaches this
(measured: Gemma 3 270M 4-6 at blocks 1-2; SmolLM2-135M 1.0-1.3)."""
MEAN_TOKENS = 8192
"""Tokens per block the training-side estimate of the block means reads (a shuffled sample)."""


def rows_of_blocks(layers: Sequence[int], layer: int | Tensor | None, n: int) -> Tensor:
    """The row of `layer_means` of each of n vectors: `layer` is one block (int) or each row's
    block (i64[n]); MlsaeError when it is missing or a block the SAE was not trained on."""
    if layer is None:
        raise MlsaeError(
            "this SAE centres each block's vectors (center_layers): the caller must give the "
            "block of the vectors it encodes"
        )
    table = torch.full((max(layers) + 1,), -1, dtype=torch.long)
    table[torch.as_tensor(list(layers), dtype=torch.long)] = torch.arange(len(layers))
    if isinstance(layer, int):
        ids = torch.full((n,), int(layer), dtype=torch.long)
    else:
        ids = layer.detach().to("cpu", torch.long).reshape(-1)
        if len(ids) != n:
            raise MlsaeError(f"{len(ids)} block indices for {n} vectors")
    bad = (ids < 0) | (ids >= len(table))
    rows = table[ids.clamp(0, len(table) - 1)]
    bad |= rows < 0
    if bool(bad.any()):
        raise MlsaeError(
            f"block {int(ids[bad][0])} is not one of the SAE's blocks {list(layers)}: it has "
            "no mean to centre with"
        )
    return rows


@dataclass
class BlockMeans:
    """Streaming per-block mean and mean squared norm of standardised vectors (float64)."""

    layers: list[int]
    d: int
    total: Tensor = field(init=False)  # f64[L, d] sum of u
    sq: Tensor = field(init=False)  # f64[L] sum of ||u||^2
    count: Tensor = field(init=False)  # f64[L]

    def __post_init__(self) -> None:
        n = len(self.layers)
        self.total = torch.zeros(n, self.d, dtype=torch.float64)
        self.sq = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)

    def update(self, u: Tensor, layer: int | Tensor) -> None:
        """Add standardised vectors u [N, d] of block(s) `layer` (int or i64[N])."""
        u = u.detach().to("cpu", torch.float64)
        rows = rows_of_blocks(self.layers, layer, len(u))
        self.total.index_add_(0, rows, u)
        self.sq.index_add_(0, rows, (u * u).sum(1))
        self.count.index_add_(0, rows, torch.ones(len(u), dtype=torch.float64))

    def means(self) -> Tensor:
        """f32[L, d] each block's mean; MlsaeError when a block has no vector."""
        if bool((self.count == 0).any()):
            missing = [ly for ly, c in zip(self.layers, self.count.tolist(), strict=True) if not c]
            raise MlsaeError(f"no vectors of blocks {missing} to estimate their means from")
        return (self.total / self.count.unsqueeze(1)).float()

    def ratios(self) -> list[float]:
        """Per block ||mean|| / RMS deviation, the RMS deviation being sqrt(E||u - mean||^2)."""
        mean = self.total / self.count.clamp_min(1).unsqueeze(1)
        norm2 = (mean * mean).sum(1)
        dev2 = (self.sq / self.count.clamp_min(1) - norm2).clamp_min(0)
        return [math.sqrt(a) / max(math.sqrt(b), 1e-12) for a, b in zip(norm2, dev2, strict=True)]


def auto_choice(ratios: Sequence[float]) -> bool:
    """`--center-layers auto`: centre when the largest block ratio reaches AUTO_RATIO."""
    return max(ratios) >= AUTO_RATIO


def describe_choice(choice: str, on: bool, layers: Sequence[int], ratios: Sequence[float]) -> str:
    """The line the training log prints about per-layer centring."""
    top = max(range(len(ratios)), key=lambda i: ratios[i])
    median = sorted(ratios)[len(ratios) // 2]
    facts = (
        f"block mean / RMS deviation: largest {ratios[top]:.2f} at block {layers[top]}, "
        f"median {median:.2f}"
    )
    why = {"auto": f"auto: largest >= {AUTO_RATIO:g}" if on else f"auto: largest < {AUTO_RATIO:g}"}
    how = why.get(choice, f"--center-layers {choice}")
    return f"per-layer centring {'on' if on else 'off'} ({how}; {facts})"
