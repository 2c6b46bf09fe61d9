"""Per-context sums of the layer statistics (SPEC 4) and their bootstrap intervals (SPEC 7).

For each context c (a window of the stream) `ContextLayerStats` keeps, from the same active
entries `LayerStats` sees:
  mass[c, l] = sum_{t in c, j} a[t,l,j]                     (for Var(L))
  W, M1, M2 [c, j] = sum_{t in c, l} a, a l, a l^2            (E_J[Var(L|J)])
  tok_dev[c] = sum_{t in c, j} s_tj Var(L|J=j,T=t)            (E_{J,T}[Var(L|J,T)])
  multi, pairs [c, j]: active (token, latent) pairs at > 1 layer / at all
  present[c, l, j]: latent j active at layer l somewhere in c (the aggregate fraction)
so a resample of contexts recomputes rel_var_latent, rel_var_token and the three multi-layer
fractions exactly as `LayerStats.result` does on the resampled tokens (l is the block index).
Memory: C x n_latents x 5 float64 + C x L x n_latents bytes (C contexts); `--bootstrap 0`
keeps none of it. The paper formula's ratios are means over its batches of 2,048 tokens: their
interval resamples those batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.core.bootstrap import Bootstrap, BootstrapInfo, Interval

F64 = torch.float64
RESAMPLE_CHUNK = 100
"""Resamples computed at once (bounds the [chunk, L x n_latents] temporaries)."""


@dataclass
class AnalysisIntervals:
    """95% bootstrap intervals of the analysis' headline numbers (None: undefined)."""

    bootstrap: BootstrapInfo
    rel_var_latent: Interval | None = None
    rel_var_token: Interval | None = None
    multi_layer_fraction_aggregate: Interval | None = None
    multi_layer_fraction_token: Interval | None = None
    multi_layer_fraction_token_per_latent: Interval | None = None
    paper_bootstrap: BootstrapInfo | None = None
    """The paper formula's resampling unit is its batch: n_contexts counts batches here."""
    paper_rel_var_latent: Interval | None = None
    paper_rel_var_token: Interval | None = None


class ContextLayerStats:
    """Per-context sums of one SAE's layer statistics (see the module docstring)."""

    def __init__(self, n_latents: int, layers: list[int]) -> None:
        self.n, self.L = n_latents, len(layers)
        self.values = torch.tensor(layers, dtype=F64)
        self.row: dict[int, int] = {}
        self.mass = torch.zeros(0, self.L, dtype=F64)
        self.W = torch.zeros(0, n_latents, dtype=F64)
        self.M1 = torch.zeros(0, n_latents, dtype=F64)
        self.M2 = torch.zeros(0, n_latents, dtype=F64)
        self.multi = torch.zeros(0, n_latents, dtype=F64)
        self.pairs = torch.zeros(0, n_latents, dtype=F64)
        self.tok_dev = torch.zeros(0, dtype=F64)
        self.present = torch.zeros(0, self.L, n_latents, dtype=torch.bool)

    def _rows(self, contexts: Tensor) -> Tensor:
        """The row of each context id [N], adding rows for new ids."""
        ids = [int(c) for c in torch.unique(contexts)]
        new = [c for c in ids if c not in self.row]
        for c in new:
            self.row[c] = len(self.row)
        if new:
            for name in ("mass", "W", "M1", "M2", "multi", "pairs", "tok_dev", "present"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros(len(new), *t.shape[1:])]))
        lut = torch.zeros(max(ids) + 1, dtype=torch.int64)
        lut[torch.tensor(ids)] = torch.tensor([self.row[c] for c in ids])
        return lut[contexts]

    def update(
        self,
        ctx: Tensor,
        entries: tuple[Tensor, Tensor, Tensor, Tensor],
        key: Tensor,
        dev: Tensor,
        cnt: Tensor,
    ) -> None:
        """Add one batch's active entries (a, latent j, layer column pos, token tok: [E]) with
        the grouping `LayerStats.update` made (per (token, latent) group: key = token x n +
        latent, s Var `dev`, layer count `cnt`), `ctx` [n] the context of each token."""
        a, j, pos, tok = entries
        r = self._rows(ctx)[tok]  # [E] row of each entry
        v = self.values[pos]
        n, L = self.n, self.L
        self.mass.view(-1).index_add_(0, r * L + pos, a)
        flat = r * n + j
        self.W.view(-1).index_add_(0, flat, a)
        self.M1.view(-1).index_add_(0, flat, a * v)
        self.M2.view(-1).index_add_(0, flat, a * v * v)
        self.present.view(-1)[(r * L + pos) * n + j] = True
        g_row = self._rows(ctx)[key // n]  # [G] row of each (token, latent) group
        g_flat = g_row * n + key % n
        self.pairs.view(-1).index_add_(0, g_flat, torch.ones(len(key), dtype=F64))
        self.multi.view(-1).index_add_(0, g_flat, (cnt > 1).to(F64))
        self.tok_dev.index_add_(0, g_row, dev)

    def _resampled(self, K: Tensor) -> dict[str, Tensor]:
        """The statistics of the resamples whose count rows are K [b, C] -> each [b]."""
        v = self.values
        total = K @ self.mass.sum(1)  # [b]
        pL = (K @ self.mass) / total[:, None].clamp_min(1e-300)  # [b, L]
        mL = pL @ v
        var_L = (pL * (v - mL[:, None]) ** 2).sum(1)
        W, M1, M2 = K @ self.W, K @ self.M1, K @ self.M2  # [b, n]
        alive = W > 0
        var_sum = torch.where(alive, M2 - M1**2 / W.clamp_min(1e-300), 0.0).sum(1)
        mean_var_lat = var_sum / total.clamp_min(1e-300)
        mean_var_tok = (K @ self.tok_dev) / total.clamp_min(1e-300)
        multi, pairs = K @ self.multi, K @ self.pairs
        per_latent = torch.where(pairs > 0, multi / pairs.clamp_min(1), 0.0).sum(1)
        n_alive = alive.sum(1).to(F64)
        drawn = (K > 0).to(torch.float32)  # [b, C]
        hit = drawn @ self.present.reshape(len(self.row), -1).to(torch.float32)  # [b, L*n]
        n_layers = (hit.reshape(len(K), self.L, self.n) > 0).sum(1)  # [b, n]
        nan = torch.tensor(math.nan, dtype=F64)
        div = lambda a, b: torch.where(b > 0, a / b.clamp_min(1e-300), nan)  # noqa: E731
        return {
            "rel_var_latent": div(mean_var_lat, var_L),
            "rel_var_token": div(mean_var_tok, mean_var_lat),
            "multi_layer_fraction_aggregate": div((n_layers > 1).sum(1).to(F64), n_alive),
            "multi_layer_fraction_token": div(multi.sum(1), pairs.sum(1)),
            "multi_layer_fraction_token_per_latent": div(per_latent, n_alive),
        }

    def intervals(
        self, n_resamples: int, seed: int, paper_batches: list[tuple[float, ...]] | None = None
    ) -> AnalysisIntervals:
        """The intervals, over this accumulator's contexts (and the paper formula's batches,
        given as its per-batch (e_var_tf, e_var_f, var_l, ...) rows)."""
        bs = Bootstrap(len(self.row), n_resamples, seed)
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, n_resamples, RESAMPLE_CHUNK):
            for k, val in self._resampled(bs.counts[start : start + RESAMPLE_CHUNK]).items():
                parts.setdefault(k, []).append(val)
        iv = {k: bs.interval(torch.cat(v)) for k, v in parts.items()}
        out = AnalysisIntervals(
            bs.info,
            rel_var_latent=iv["rel_var_latent"],
            rel_var_token=iv["rel_var_token"],
            multi_layer_fraction_aggregate=iv["multi_layer_fraction_aggregate"],
            multi_layer_fraction_token=iv["multi_layer_fraction_token"],
            multi_layer_fraction_token_per_latent=iv["multi_layer_fraction_token_per_latent"],
        )
        if paper_batches:
            rows = torch.tensor(
                [
                    [f / vl if vl else math.nan, tf / f if f else math.nan]
                    for tf, f, vl, *_ in paper_batches
                ],
                dtype=F64,
            )
            pb = Bootstrap(len(rows), n_resamples, seed)
            means = pb.sums(rows) / len(rows)  # [B, 2] the mean over the resampled batches
            out.paper_bootstrap = pb.info
            out.paper_rel_var_latent = pb.interval(means[:, 0])
            out.paper_rel_var_token = pb.interval(means[:, 1])
        return out
