"""Confidence intervals by a percentile bootstrap over contexts (SPEC section 7): the one
implementation, used by `evaluate`, `analyze`, `evolution` and `lens evaluate`.

A statistic is computed from per-context sums (one row per evaluated context, i.e. document
window): resampling the C contexts with replacement B times is one count matrix K [B, C]
(K[b, c] = how often context c was drawn in resample b; each row is a multinomial draw of C
with equal probabilities), and the resampled sums are K @ sums. A ratio such as FVU is the sum
of the numerators over the sum of the denominators of the resampled contexts. The interval is
the 2.5 and 97.5 percentiles of the B resampled values (resamples where the statistic is
undefined, e.g. a zero denominator, are left out). No model reruns: only sums are resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError

LEVEL = 0.95
"""Coverage of every interval: the 2.5 and 97.5 percentiles."""


@dataclass(frozen=True)
class Interval:
    """A percentile-bootstrap interval of one number (SPEC 7)."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]"

    def overlaps(self, other: Interval) -> bool:
        """Whether the two intervals share a point (a verdict between them is inconclusive)."""
        return self.low <= other.high and other.low <= self.high


@dataclass(frozen=True)
class BootstrapInfo:
    """How a result's intervals were made (written beside them)."""

    n_contexts: int
    """Contexts (documents) resampled: the unit of the bootstrap."""
    n_resamples: int
    seed: int
    level: float = LEVEL


def resample_indices(n_contexts: int, n_resamples: int, seed: int) -> np.ndarray:
    """[B, C] int64: the contexts drawn (uniformly, with replacement) by each resample. The
    count matrix is made from exactly these draws, so a loop over them is its brute force."""
    if n_contexts < 1 or n_resamples < 1:
        raise MlsaeError(
            f"the bootstrap needs contexts and resamples (got {n_contexts}, {n_resamples})"
        )
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_contexts, size=(n_resamples, n_contexts), dtype=np.int64)


class Bootstrap:
    """The resamples of C contexts: `sums(x)` resamples per-context sums, `interval(values)`
    takes the percentiles of a resampled statistic."""

    def __init__(self, n_contexts: int, n_resamples: int = 1000, seed: int = 0) -> None:
        idx = resample_indices(n_contexts, n_resamples, seed)
        rows = np.arange(n_resamples, dtype=np.int64)[:, None] * n_contexts
        flat = np.bincount((idx + rows).ravel(), minlength=n_resamples * n_contexts)
        self.counts = torch.from_numpy(flat.reshape(n_resamples, n_contexts).astype(np.float64))
        """[B, C] float64: how often each context is drawn in each resample."""
        self.info = BootstrapInfo(n_contexts, n_resamples, seed)

    @property
    def n_contexts(self) -> int:
        return self.info.n_contexts

    def sums(self, per_context: Tensor) -> Tensor:
        """per_context [C, ...] -> [B, ...] float64: each resample's sum over its contexts."""
        x = per_context.to(torch.float64)
        if x.shape[0] != self.n_contexts:
            raise MlsaeError(f"{x.shape[0]} per-context rows for {self.n_contexts} contexts")
        return (self.counts @ x.reshape(self.n_contexts, -1)).reshape(-1, *x.shape[1:])

    def ratio(self, num: Tensor, den: Tensor) -> Tensor:
        """[B, ...]: sum of numerators / sum of denominators of each resample (NaN where the
        denominator is 0)."""
        n, d = self.sums(num), self.sums(den)
        return torch.where(d > 0, n / d.clamp_min(1e-300), torch.nan)

    @staticmethod
    def interval(values: Tensor) -> Interval | None:
        """The percentile interval of a resampled statistic [B] (NaN resamples left out);
        None when no resample defines it."""
        v = values.detach().to(torch.float64).reshape(-1).numpy()
        v = v[np.isfinite(v)]
        if v.size == 0:
            return None
        tail = (1.0 - LEVEL) / 2 * 100
        low, high = np.percentile(v, [tail, 100 - tail])
        return Interval(float(low), float(high))

    def intervals(self, values: Tensor) -> list[Interval | None]:
        """One interval per column of a resampled statistic [B, K]."""
        return [self.interval(values[:, i]) for i in range(values.shape[1])]


def total_variance(bs: Bootstrap, n: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    """Resampled sum_t ||x_t - mean||^2 (the per-dimension mean of the resampled tokens) from
    per-context moments: counts n [C, ...], means [C, ..., d], sums of squared deviations from
    their own mean m2 [C, ...] (summed over d). Law of total variance, centred on the pooled
    mean so no large terms cancel. -> [B, ...]."""
    n = n.to(torch.float64)
    total = n.sum(0).clamp_min(1)
    pooled = (n[..., None] * mean).sum(0) / total[..., None]  # [..., d]
    dev = mean - pooled  # [C, ..., d] each context's mean off the pooled one
    within = bs.sums(m2)  # [B, ...]
    wn = bs.sums(n)  # [B, ...]
    wsum = bs.sums(n[..., None] * dev)  # [B, ..., d]
    wsq = bs.sums(n * dev.pow(2).sum(-1))  # [B, ...]
    between = wsq - wsum.pow(2).sum(-1) / wn.clamp_min(1)
    return within + between


def mean_over_columns(values: Tensor) -> Tensor:
    """[B, K] -> [B]: the mean over the columns that are defined (as `mean_or_none`)."""
    ok = torch.isfinite(values)
    cnt = ok.sum(1)
    s = torch.where(ok, values, 0.0).sum(1)
    return torch.where(cnt > 0, s / cnt.clamp_min(1), math.nan)
