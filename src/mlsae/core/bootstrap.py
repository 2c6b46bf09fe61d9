"""Confidence intervals by a bootstrap over contexts (SPEC section 7): the one
implementation, used by `evaluate`, `analyze`, `evolution` and `lens evaluate`.

A statistic is computed from per-context sums (one row per evaluated context, i.e. document
window): resampling the C contexts with replacement B times is one count matrix K [B, C]
(K[b, c] = how often context c was drawn in resample b; each row is a multinomial draw of C
with equal probabilities), and the resampled sums are K @ sums. A ratio such as FVU is the sum
of the numerators over the sum of the denominators of the resampled contexts. The interval is
the 2.5 and 97.5 percentiles of the B resampled values (resamples where the statistic is
undefined, e.g. a zero denominator, are left out). No model reruns: only sums are resampled.

That percentile interval suits a statistic whose resamples centre on its point estimate. A
rate that counts features over a threshold (the evolution rates and their controls: the share
of features whose best-partner Pearson is >= 0.95) is not one: on sparse features a resampled
Pearson crosses the threshold upward more often than downward, so the resampled rates sit
above the estimate (often all of them), and the estimate sits above the true rate by a like
or larger amount, so the percentile interval lies on the wrong side of the truth. Two
textbook remedies fail there: the basic interval [2 t - q97.5, 2 t - q2.5] (the percentiles
reflected about the estimate t) is right when the estimate is off by what the resamples show,
wrong when it is not (a rate near 0 whose resamples scatter both ways); BC / BCa (Efron 1987,
`bca`, kept to show it) can only pick percentiles of the resamples, so when all of them lie
above t it returns their lowest values. Such rates use `symmetric`: t +- h with h the larger
distance from t to a percentile endpoint, the smallest interval holding both the percentile
and the basic interval and always the estimate. On synthetic pairs with known Pearson its
coverage is 0.65-0.80 where the estimate's bias is 2-3 resampling sds (percentile 0, BCa
0-0.03, basic 0.65-0.77), 0.91-0.94 at about 1 sd (percentile 0.61-0.66, BCa 0.75, basic
0.76-0.85), 0.99-1.0 when mild (tests/test_bootstrap_corrected.py, docs/findings.md): a
bias the resamples do not show (a feature whose partner misses it in contexts the data lacks)
no resampling interval can correct. The jackknife's leave-one-context-out sums come from the
same per-context sums (`LeaveOneOut`), the point estimate from `Whole`, so one statistic
function gives the estimate, the resamples and the jackknife.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtr, ndtri
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


class ContextWeights(ABC):
    """Rows of weights over C contexts (a resample, a jackknife sample, or the whole data): a
    statistic written against `sums` / `ratio` is computed for every row at once."""

    n_contexts: int

    @abstractmethod
    def sums(self, per_context: Tensor) -> Tensor:
        """per_context [C, ...] -> [R, ...] float64: each row's weighted sum over contexts."""

    def _rows(self, per_context: Tensor) -> Tensor:
        x = per_context.to(torch.float64)
        if x.shape[0] != self.n_contexts:
            raise MlsaeError(f"{x.shape[0]} per-context rows for {self.n_contexts} contexts")
        return x

    def ratio(self, num: Tensor, den: Tensor) -> Tensor:
        """[R, ...]: sum of numerators / sum of denominators of each row (NaN where the
        denominator is 0)."""
        n, d = self.sums(num), self.sums(den)
        return torch.where(d > 0, n / d.clamp_min(1e-300), torch.nan)


class Whole(ContextWeights):
    """One row: every context once (the point estimate)."""

    def __init__(self, n_contexts: int) -> None:
        self.n_contexts = n_contexts

    def sums(self, per_context: Tensor) -> Tensor:
        return self._rows(per_context).sum(0, keepdim=True)


class LeaveOneOut(ContextWeights):
    """C rows: row c leaves context c out (the jackknife over contexts)."""

    def __init__(self, n_contexts: int) -> None:
        self.n_contexts = n_contexts

    def sums(self, per_context: Tensor) -> Tensor:
        x = self._rows(per_context)
        return x.sum(0, keepdim=True) - x


class Bootstrap(ContextWeights):
    """The resamples of C contexts: `sums(x)` resamples per-context sums, `interval(values)`
    takes the percentiles of a resampled statistic, `symmetric` (with `basic`) the interval of a
    threshold count, `bca` the comparison (module docstring)."""

    def __init__(self, n_contexts: int, n_resamples: int = 1000, seed: int = 0) -> None:
        idx = resample_indices(n_contexts, n_resamples, seed)
        rows = np.arange(n_resamples, dtype=np.int64)[:, None] * n_contexts
        flat = np.bincount((idx + rows).ravel(), minlength=n_resamples * n_contexts)
        self.counts = torch.from_numpy(flat.reshape(n_resamples, n_contexts).astype(np.float64))
        """[B, C] float64: how often each context is drawn in each resample."""
        self.info = BootstrapInfo(n_contexts, n_resamples, seed)
        self.n_contexts = n_contexts

    def sums(self, per_context: Tensor) -> Tensor:
        """per_context [C, ...] -> [B, ...] float64: each resample's sum over its contexts."""
        x = self._rows(per_context)
        return (self.counts @ x.reshape(self.n_contexts, -1)).reshape(-1, *x.shape[1:])

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

    @staticmethod
    def basic(
        values: Tensor, estimate: float, bounds: tuple[float, float] = (-math.inf, math.inf)
    ) -> Interval | None:
        """The basic (reverse-percentile) interval [2 t - q_high, 2 t - q_low] of a resampled
        statistic [B] with point estimate t, clipped to `bounds` (a fraction: (0, 1)); None
        when t or every resample is undefined."""
        iv = Bootstrap.interval(values)
        if iv is None or not math.isfinite(estimate):
            return None
        low = min(max(2 * estimate - iv.high, bounds[0]), bounds[1])
        high = min(max(2 * estimate - iv.low, bounds[0]), bounds[1])
        return Interval(low, high)

    @staticmethod
    def symmetric(
        values: Tensor, estimate: float, bounds: tuple[float, float] = (-math.inf, math.inf)
    ) -> Interval | None:
        """[t - h, t + h] with h = max(q97.5 - t, t - q2.5): the percentile and the basic
        interval together, for a statistic whose resamples sit off its estimate t (module
        docstring); clipped to `bounds`. None when t or every resample is undefined."""
        pct, basic = Bootstrap.interval(values), Bootstrap.basic(values, estimate, bounds)
        if pct is None or basic is None:
            return None
        low, high = max(pct.low, bounds[0]), min(pct.high, bounds[1])
        return Interval(min(low, basic.low), max(high, basic.high))

    @staticmethod
    def bca(values: Tensor, estimate: float, jackknife: Tensor) -> Interval | None:
        """The BCa interval (Efron 1987; as scipy.stats.bootstrap(method='BCa')) of a resampled
        statistic [B] with point estimate t and leave-one-context-out values [C]: z0 =
        Phi^-1(share of resamples below t, ties counted half), a = sum d^3 / (6 (sum d^2)^1.5)
        with d the jackknife values' mean minus each; the percentiles taken at Phi(z0 + (z0 +
        z) / (1 - a (z0 + z))) for z = Phi^-1(0.025), Phi^-1(0.975)."""
        v = values.detach().to(torch.float64).reshape(-1).numpy()
        v = v[np.isfinite(v)]
        jk = jackknife.detach().to(torch.float64).reshape(-1).numpy()
        jk = jk[np.isfinite(jk)]
        if v.size == 0 or not math.isfinite(estimate):
            return None
        below = (np.count_nonzero(v < estimate) + np.count_nonzero(v <= estimate)) / (2 * v.size)
        z0 = float(ndtri(min(max(below, 0.5 / v.size), 1 - 0.5 / v.size)))
        d = jk.mean() - jk if jk.size else np.zeros(1)
        ss = float((d * d).sum())
        a = float((d**3).sum()) / (6 * ss**1.5) if ss > 0 else 0.0
        tail = (1.0 - LEVEL) / 2
        levels = []
        for z in (float(ndtri(tail)), float(ndtri(1 - tail))):
            levels.append(float(ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))) * 100)
        low, high = np.percentile(v, levels)
        return Interval(float(low), float(high))

    def leave_one_out(self) -> LeaveOneOut:
        """The jackknife over the same contexts (for `bca`)."""
        return LeaveOneOut(self.n_contexts)

    def whole(self) -> Whole:
        """All contexts once (the point estimate, by the same statistic function)."""
        return Whole(self.n_contexts)

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
