"""Per-context sums of the evaluation metrics, for the bootstrap intervals (SPEC 7).

`ContextSums` keeps, per evaluated context (a window of the split's context stream) and layer:
the vector count, the per-dimension mean and the sum of squared deviations of x (so the
resampled FVU denominator uses the resampled tokens' own mean, as FVU does), the squared error
sum_t ||x - x_hat||^2, and the delta CE / KL sums over predicted positions. Memory: C x L x d
float64 (C contexts): 8,192 tokens of 256-token contexts over 30 layers of width 576 take 4 MB.
`intervals` turns them into FVU, delta CE and KL intervals per layer and for the mean over
layers, from one count matrix (core/bootstrap.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mlsae.core.bootstrap import Bootstrap, Interval, mean_over_columns, total_variance

F64 = torch.float64


class ContextSums:
    """Per-context, per-layer sums of one SAE's evaluation (see the module docstring)."""

    def __init__(self, layers: Sequence[int], d: int) -> None:
        self.layers = [int(x) for x in layers]
        self._col = {layer: i for i, layer in enumerate(self.layers)}
        self.d = d
        self.row: dict[int, int] = {}  # context id -> row
        L = len(self.layers)
        self.n = torch.zeros(0, L, dtype=F64)  # [C, L] vectors
        self.mean = torch.zeros(0, L, d, dtype=F64)  # [C, L, d]
        self.m2 = torch.zeros(0, L, dtype=F64)  # [C, L] sum ||x - mean_c||^2
        self.sq_err = torch.zeros(0, L, dtype=F64)  # [C, L] sum ||x - x_hat||^2
        self.ce = torch.zeros(0, L, dtype=F64)  # [C, L] sum of delta CE
        self.kl = torch.zeros(0, L, dtype=F64)  # [C, L] sum of KL
        self.n_pred = torch.zeros(0, L, dtype=F64)  # [C, L] predicted positions

    def _rows(self, contexts: Tensor) -> tuple[Tensor, Tensor]:
        """(unique rows [U], inverse [N]) of the context ids, adding rows for new contexts."""
        ids, inv = torch.unique(contexts.cpu(), return_inverse=True)
        new = [int(c) for c in ids if int(c) not in self.row]
        if new:
            for c in new:
                self.row[c] = len(self.row)
            grow = len(new)
            for name in ("n", "m2", "sq_err", "ce", "kl", "n_pred"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros(grow, t.shape[1])]))
            self.mean = torch.cat([self.mean, self.mean.new_zeros(grow, *self.mean.shape[1:])])
        rows = torch.tensor([self.row[int(c)] for c in ids], dtype=torch.int64)
        return rows, inv

    def update(self, layer: int, contexts: Tensor, x: Tensor, x_hat: Tensor) -> None:
        """Add vectors x, x_hat [N, d] of one layer, from the contexts `contexts` [N]."""
        if x.shape[0] == 0:
            return
        j = self._col[layer]
        x, x_hat = (t.detach().to("cpu", F64) for t in (x, x_hat))
        rows, inv = self._rows(contexts)
        U = rows.numel()
        nb = torch.zeros(U, dtype=F64).index_add_(0, inv, torch.ones(len(inv), dtype=F64))
        mean_b = torch.zeros(U, self.d, dtype=F64).index_add_(0, inv, x) / nb[:, None]
        m2_b = torch.zeros(U, dtype=F64).index_add_(0, inv, (x - mean_b[inv]).pow(2).sum(1))
        err = torch.zeros(U, dtype=F64).index_add_(0, inv, (x - x_hat).pow(2).sum(1))
        # merge into what the rows already hold (Chan et al.'s parallel update)
        n0, mean0 = self.n[rows, j], self.mean[rows, j]
        n = n0 + nb
        delta = mean_b - mean0
        self.mean[rows, j] = mean0 + delta * (nb / n)[:, None]
        self.m2[rows, j] += m2_b + delta.pow(2).sum(1) * (n0 * nb / n)
        self.n[rows, j] = n
        self.sq_err[rows, j] += err

    def update_splice(
        self, layer: int, contexts: Tensor, ce: Tensor, kl: Tensor, n: Tensor
    ) -> None:
        """Add delta CE / KL sums and predicted-position counts of contexts `contexts` [R]."""
        j = self._col[layer]
        rows, inv = self._rows(contexts)
        for name, v in (("ce", ce), ("kl", kl), ("n_pred", n)):
            add = torch.zeros(rows.numel(), dtype=F64).index_add_(0, inv, v.to("cpu", F64))
            getattr(self, name)[rows, j] += add

    @property
    def n_contexts(self) -> int:
        return len(self.row)

    def fvu(self, bs: Bootstrap) -> Tensor:
        """[B, L] resampled FVU (NaN where a resample has no variance)."""
        tv = total_variance(bs, self.n, self.mean, self.m2)
        err = bs.sums(self.sq_err)
        return torch.where(tv > 0, err / tv.clamp_min(1e-300), torch.nan)

    def per_position(self, bs: Bootstrap, key: str) -> Tensor:
        """[B, L] resampled mean of delta CE ('ce') or KL ('kl') over predicted positions."""
        return bs.ratio(getattr(self, key), self.n_pred)

    def aligned(self, order: dict[int, int]) -> ContextSums:
        """A copy with rows in the order `order` (context id -> row), zeros where absent."""
        out = ContextSums(self.layers, self.d)
        out.row = dict(order)
        C = len(order)
        src = torch.tensor([self.row[c] for c in order if c in self.row], dtype=torch.int64)
        dst = torch.tensor([r for c, r in order.items() if c in self.row], dtype=torch.int64)
        for name in ("n", "mean", "m2", "sq_err", "ce", "kl", "n_pred"):
            t = getattr(self, name)
            z = t.new_zeros(C, *t.shape[1:])
            z[dst] = t[src]
            setattr(out, name, z)
        return out


def metric_intervals(
    values: Tensor, bs: Bootstrap
) -> tuple[list[Interval | None], Interval | None]:
    """(per-layer intervals, interval of the mean over layers) of a resampled [B, L] metric."""
    return bs.intervals(values), bs.interval(mean_over_columns(values))
