"""Vectors that dominate a layer's variance: per layer, how many used vectors have a norm far
above the layer's median norm (attention sinks and the like), and what share of the layer's
variance they carry. A per-layer FVU is a ratio of sums over vectors, so a few such vectors can
decide it; `mlsae cache` and `mlsae evaluate` report this next to their numbers.

Exact in two passes over a source (float64): pass 1 keeps every used vector's norm (4 bytes per
vector) and the per-layer moments; pass 2 sums, over the outliers, ||x||^2 and x. The variance
share is sum_O ||x - mu||^2 / sum_t ||x - mu||^2 with mu the per-dimension mean over all used
vectors of the layer (the FVU denominator of SPEC 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlsae.activations.source import ActivationSource

F64 = torch.float64
DEFAULT_FACTOR = 10.0
"""A vector is an outlier when its norm is more than this times its layer's median norm."""


@dataclass
class NormOutliers:
    """Per layer (lists aligned with `layers`)."""

    layers: list[int]
    factor: float
    n_vectors: int  # used vectors per layer
    median_norm: list[float]
    n_outliers: list[int]
    variance_share: list[float]  # share of the layer's total variance carried by the outliers

    def summary(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "layers": self.layers,
            "n_vectors": self.n_vectors,
            "median_norm": self.median_norm,
            "n_outliers": self.n_outliers,
            "variance_share": self.variance_share,
        }

    @classmethod
    def from_summary(cls, d: dict[str, Any]) -> NormOutliers:
        return cls(
            **{
                k: d[k]
                for k in (
                    "layers",
                    "factor",
                    "n_vectors",
                    "median_norm",
                    "n_outliers",
                    "variance_share",
                )
            }
        )

    def select(self, layers: list[int]) -> NormOutliers:
        """The report restricted to some layers."""
        pos = [self.layers.index(ly) for ly in layers]
        pick = lambda v: [v[i] for i in pos]  # noqa: E731
        return NormOutliers(
            list(layers),
            self.factor,
            self.n_vectors,
            pick(self.median_norm),
            pick(self.n_outliers),
            pick(self.variance_share),
        )

    def dominated(self, share: float = 0.5) -> list[int]:
        """Layers where outliers carry more than `share` of the variance."""
        return [ly for ly, s in zip(self.layers, self.variance_share, strict=True) if s > share]

    def describe(self) -> str:
        """One line for a log or a table footer."""
        total = sum(self.n_outliers)
        if not total:
            return f"no vector has a norm above {self.factor:g}x its layer's median"
        dom = self.dominated()
        worst = max(self.variance_share)
        return (
            f"{total} vectors over {sum(n > 0 for n in self.n_outliers)} layers have a norm above "
            f"{self.factor:g}x their layer's median; they carry up to {worst:.0%} of a layer's "
            f"variance" + (f" (over half at layers {dom})" if dom else "")
        )


@torch.no_grad()
def norm_outliers(
    source: ActivationSource, factor: float = DEFAULT_FACTOR, max_tokens: int | None = None
) -> NormOutliers:
    """The outlier report of the used vectors of every layer of `source` (up to max_tokens)."""
    L, d = len(source.layers), source.d_model
    norms: list[torch.Tensor] = []  # [n_used, L] float32 per block
    s1 = torch.zeros(L, d, dtype=F64)  # sum x
    s2 = torch.zeros(L, dtype=F64)  # sum ||x||^2
    n = 0
    for b in source.iter_ordered(max_tokens):
        x = b.activations[b.mask].float()  # [m, L, d]
        n += len(x)
        s1 += x.sum(0).to(F64)
        sq = x.pow(2).sum(-1)  # [m, L]
        s2 += sq.sum(0).to(F64)
        norms.append(sq.sqrt())
    if n == 0:
        z = [0.0] * L
        return NormOutliers(list(source.layers), factor, 0, z, [0] * L, z)
    allnorm = torch.cat(norms)  # [n, L]
    median = nonzero_median(allnorm)  # [L]
    thr = median * factor
    mu = s1 / n  # [L, d]
    total = s2 - n * mu.pow(2).sum(-1)  # [L] sum ||x - mu||^2
    o1 = torch.zeros(L, d, dtype=F64)
    o2 = torch.zeros(L, dtype=F64)
    count = (allnorm > thr).sum(0)
    if int(count.sum()):
        start = 0
        for b in source.iter_ordered(max_tokens):
            x = b.activations[b.mask].float()  # [m, L, d]
            on = allnorm[start : start + len(x)] > thr  # [m, L]
            start += len(x)
            xo = x * on[..., None]
            o1 += xo.sum(0).to(F64)
            o2 += xo.pow(2).sum(-1).sum(0).to(F64)
    share = (o2 - 2 * (o1 * mu).sum(-1) + count.to(F64) * mu.pow(2).sum(-1)) / total.clamp_min(
        1e-300
    )
    return NormOutliers(
        list(source.layers),
        factor,
        n,
        median.tolist(),
        count.tolist(),
        share.clamp(0, 1).tolist(),
    )


def nonzero_median(norms: torch.Tensor) -> torch.Tensor:
    """[L] each column's median over its non-zero entries of norms [n, L] (0 if none). An
    exactly-zero vector (a synthetic token with no feature at that layer) says nothing about a
    layer's typical norm; counted, a majority of them made the median 0 and every other vector
    an outlier."""
    out = torch.zeros(norms.shape[1], dtype=norms.dtype)
    for ly in range(norms.shape[1]):
        nz = norms[:, ly][norms[:, ly] > 0]
        if len(nz):
            out[ly] = nz.median()
    return out
