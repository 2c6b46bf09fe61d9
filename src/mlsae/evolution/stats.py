"""Pass 1 and pass 2 accumulators of `mlsae evolution` (see mlsae.evolution.measures for the measures).

Pass 1 (`FeatureStats`) gives per feature the sums, max, activity counts and top contexts of
one layer's SAE; pass 2 (`PairStats`) accumulates sum_t a_i b_j (float64) and |A_i & B_j|
(int32) for an adjacent pair as dense [d_up, d_down] matrices filled by index_add over the
k x k code products of each token: 12 bytes per feature pair.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


class FeatureStats:
    """Pass 1 for one layer's SAE: per-feature sums, max, activity and top contexts."""

    def __init__(self, d_sae: int, n_contexts: int = 5) -> None:
        self.d = d_sae
        self.n = 0  # used tokens seen
        self.sum = torch.zeros(d_sae, dtype=F64)  # [d] sum_t a
        self.sumsq = torch.zeros(d_sae, dtype=F64)  # [d] sum_t a^2
        self.max = torch.zeros(d_sae, dtype=F64)  # [d] max_t a
        self.nonzero = torch.zeros(d_sae, dtype=torch.int64)  # [d] #tokens with a > 0
        c = max(int(n_contexts), 0)
        self.top_val = torch.full((d_sae, c), -math.inf)  # [d, C] descending
        self.top_pos = torch.full((d_sae, c), -1, dtype=torch.int64)  # [d, C] token positions

    def update(self, idx: Tensor, acts: Tensor, pos: Tensor | None = None) -> None:
        """idx, acts: [n, k] TopK codes of n used tokens; pos: [n] their stream positions."""
        self.n += idx.shape[0]
        f = idx.reshape(-1).long()
        v = acts.reshape(-1).to(F64)
        self.sum.index_add_(0, f, v)
        self.sumsq.index_add_(0, f, v * v)
        self.nonzero.index_add_(0, f, (v > 0).long())
        self.max.scatter_reduce_(0, f, v, "amax")
        c = self.top_val.shape[1]
        if c == 0 or pos is None:
            return
        p = pos.long()[:, None].expand_as(idx).reshape(-1)
        on = v > 0
        f, v32, p = f[on], v[on].float(), p[on]
        order = torch.argsort(v32, descending=True, stable=True)
        order = order[torch.argsort(f[order], stable=True)]  # by feature, then value desc
        f, v32, p = f[order], v32[order], p[order]
        starts = torch.searchsorted(f, f, side="left")
        rank = torch.arange(len(f)) - starts  # rank within feature
        keep = rank < c
        bv = torch.full((self.d, c), -math.inf)
        bp = torch.full((self.d, c), -1, dtype=torch.int64)
        bv[f[keep], rank[keep]] = v32[keep]
        bp[f[keep], rank[keep]] = p[keep]
        vals, sel = torch.cat([self.top_val, bv], 1).topk(c, dim=1)
        self.top_pos = torch.cat([self.top_pos, bp], 1).gather(1, sel)
        self.top_val = vals

    @property
    def alive(self) -> Tensor:
        """[d] bool: active (> 0) on at least one token."""
        return self.nonzero > 0

    def threshold(self, fraction: float = 0.2) -> Tensor:
        """[d] the 'active' threshold fraction x max; a dead feature's (0) is never exceeded."""
        return self.max * fraction

    def density(self) -> Tensor:
        """[d] fraction of used tokens with activation > 0."""
        return self.nonzero.double() / max(self.n, 1)


class PairStats:
    """Pass 2 for one adjacent pair: sum_t a_i b_j and |A_i & B_j| as dense matrices."""

    def __init__(self, thr_up: Tensor, thr_down: Tensor, max_entries: int = 1 << 21) -> None:
        self.thr_up, self.thr_down = thr_up.to(F64), thr_down.to(F64)
        self.d_up, self.d_down = len(thr_up), len(thr_down)
        self.cross = torch.zeros(self.d_up * self.d_down, dtype=F64)  # [d_up*d_down]
        self.co = torch.zeros(self.d_up * self.d_down, dtype=torch.int32)  # [d_up*d_down]
        self.n_up = torch.zeros(self.d_up, dtype=torch.int64)  # [d_up] |A_i|
        self.n_down = torch.zeros(self.d_down, dtype=torch.int64)  # [d_down] |B_j|
        self.max_entries = max_entries

    @staticmethod
    def nbytes(d_up: int, d_down: int) -> int:
        """Bytes of the two accumulators."""
        return d_up * d_down * 12

    def update(self, up_idx: Tensor, up_acts: Tensor, down_idx: Tensor, down_acts: Tensor) -> None:
        """Codes of the same n tokens at both layers: [n, k_up] and [n, k_down]."""
        up_idx, down_idx = up_idx.long(), down_idx.long()
        a, b = up_acts.to(F64), down_acts.to(F64)
        on_a = a > self.thr_up[up_idx]  # [n, k_up]
        on_b = b > self.thr_down[down_idx]  # [n, k_down]
        self.n_up.index_add_(0, up_idx[on_a], torch.ones_like(up_idx[on_a]))
        self.n_down.index_add_(0, down_idx[on_b], torch.ones_like(down_idx[on_b]))
        step = max(1, self.max_entries // max(1, a.shape[1] * b.shape[1]))
        for s in range(0, a.shape[0], step):
            sl = slice(s, s + step)
            flat = (up_idx[sl, :, None] * self.d_down + down_idx[sl, None, :]).reshape(-1)
            self.cross.index_add_(0, flat, (a[sl, :, None] * b[sl, None, :]).reshape(-1))
            both = (on_a[sl, :, None] & on_b[sl, None, :]).reshape(-1)
            hit = flat[both]
            self.co.index_add_(0, hit, torch.ones(len(hit), dtype=torch.int32))

    def matrices(self) -> tuple[Tensor, Tensor]:
        """Views [d_up, d_down] of the cross sums and co-activity counts."""
        return self.cross.view(self.d_up, self.d_down), self.co.view(self.d_up, self.d_down)
