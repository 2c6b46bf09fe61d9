"""Residual-stream geometry (SPEC section 4): adjacent-layer cosine similarity of centred vectors
and the distribution of vector norms by layer. Streaming, float64, exact in two passes.

Centring needs each layer's mean over the data, and the cosine normalises every token's centred
vector, so no finite one-pass sums give it exactly: pass 1 accumulates the per-layer sums (mean),
the norm moments and the norm range; pass 2 computes the cosines around the exact means and a
fixed-bin histogram of the norms over [min, max] of each layer (quantiles to within one bin).

"Adjacent" means consecutive entries of the layer list (blocks l and l+1 for a full cache).
Only tokens whose mask is True count; a token whose centred vector is exactly zero at either
layer has no cosine and is skipped for that pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError

F64 = torch.float64
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class GeometryResult:
    layers: list[int]
    n_tokens: int
    adjacent_cosine: list[float]  # [L-1] mean cos(x_l - mu_l, x_{l+1} - mu_{l+1})
    adjacent_cosine_raw: list[float]  # [L-1] the same without centring
    norm_mean: list[float]  # [L] mean ||x_l||
    norm_std: list[float]  # [L]
    norm_min: list[float]
    norm_max: list[float]
    norm_quantiles: dict[str, list[float]]  # "0.05" -> [L], from the histogram
    norm_hist: np.ndarray  # [L, bins] counts over [norm_min, norm_max] per layer


class ResidualGeometry:
    """Two-pass accumulator. Pass 1: `update_pass1(x, mask)` for every batch, then
    `update_pass2(x, mask)` for every batch (the same data), then `result()`.
    x: [n, L, d] residual vectors (any float dtype), mask: bool[n] or None."""

    def __init__(self, layers: Sequence[int], d_model: int, bins: int = 512) -> None:
        self.layers = [int(x) for x in layers]
        L = len(self.layers)
        self.bins = bins
        self.sum = torch.zeros(L, d_model, dtype=F64)  # [L, d]
        self.norm_sum = torch.zeros(L, dtype=F64)
        self.norm_sq = torch.zeros(L, dtype=F64)
        self.norm_min = torch.full((L,), math.inf, dtype=F64)
        self.norm_max = torch.full((L,), -math.inf, dtype=F64)
        self.n1 = 0
        self.mean: Tensor | None = None  # [L, d] set when pass 2 starts
        self.cos_sum = torch.zeros(max(L - 1, 0), dtype=F64)
        self.cos_n = torch.zeros(max(L - 1, 0), dtype=F64)
        self.raw_sum = torch.zeros(max(L - 1, 0), dtype=F64)
        self.raw_n = torch.zeros(max(L - 1, 0), dtype=F64)
        self.hist = torch.zeros(L, bins, dtype=torch.int64)
        self.n2 = 0

    def _check(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != len(self.layers) or x.shape[2] != self.sum.shape[1]:
            raise MlsaeError(f"expected [n, {len(self.layers)}, {self.sum.shape[1]}] vectors")
        return x if mask is None else x[mask]

    @torch.no_grad()
    def update_pass1(self, x: Tensor, mask: Tensor | None = None) -> None:
        if self.mean is not None:
            raise MlsaeError("pass 1 is over: geometry pass 2 has started")
        x = self._check(x, mask)
        self.n1 += x.shape[0]
        for i in range(len(self.layers)):  # per layer keeps the float64 copy small
            xl = x[:, i].to(F64)  # [n, d]
            self.sum[i] += xl.sum(0)
            nrm = xl.norm(dim=1)  # [n]
            if nrm.numel():
                self.norm_sum[i] += nrm.sum()
                self.norm_sq[i] += (nrm * nrm).sum()
                self.norm_min[i] = torch.minimum(self.norm_min[i], nrm.min())
                self.norm_max[i] = torch.maximum(self.norm_max[i], nrm.max())

    @torch.no_grad()
    def update_pass2(self, x: Tensor, mask: Tensor | None = None) -> None:
        if self.mean is None:
            if self.n1 == 0:
                raise MlsaeError("no tokens in geometry pass 1")
            self.mean = self.sum / self.n1
        x = self._check(x, mask)
        self.n2 += x.shape[0]
        lo, hi = self.norm_min, self.norm_max
        width = (hi - lo).clamp_min(1e-300)
        mu = self.mean
        prev: tuple[Tensor, Tensor, Tensor] | None = None  # (x - mu, ||x - mu||, ||x||)
        for i in range(len(self.layers)):
            xc = x[:, i].to(F64)  # [n, d], centred in place below
            nrm = xc.norm(dim=1)  # [n] ||x||
            b = ((nrm - lo[i]) / width[i] * self.bins).long().clamp_(0, self.bins - 1)
            self.hist[i] += torch.bincount(b, minlength=self.bins)
            xc.sub_(mu[i])
            nc = xc.norm(dim=1)  # [n] ||x - mu||
            if prev is not None:
                pc, pnc, pn = prev
                dot_c = torch.linalg.vecdot(pc, xc)  # [n] (x_p - mu_p).(x - mu)
                # raw x_p.x from the centred vectors: + (x_p - mu_p).mu + mu_p.(x - mu) + mu_p.mu
                dot_r = dot_c + pc @ mu[i] + xc @ mu[i - 1] + mu[i - 1] @ mu[i]
                for acc_s, acc_n, c in (
                    (self.cos_sum, self.cos_n, dot_c / (pnc * nc)),
                    (self.raw_sum, self.raw_n, dot_r / (pn * nrm)),
                ):
                    ok = torch.isfinite(c)  # a zero vector has no cosine
                    acc_s[i - 1] += c[ok].sum()
                    acc_n[i - 1] += ok.sum()
            prev = (xc, nc, nrm)

    def result(self) -> GeometryResult:
        if self.n2 != self.n1:
            raise MlsaeError(
                f"geometry passes saw {self.n1} and {self.n2} tokens: not the same data"
            )
        n = max(self.n1, 1)
        mean = self.norm_sum / n
        std = (self.norm_sq / n - mean**2).clamp_min(0).sqrt()
        cos = torch.where(self.cos_n > 0, self.cos_sum / self.cos_n.clamp_min(1), math.nan)
        raw = torch.where(self.raw_n > 0, self.raw_sum / self.raw_n.clamp_min(1), math.nan)
        qs = hist_quantiles(self.hist.numpy(), self.norm_min.numpy(), self.norm_max.numpy())
        return GeometryResult(
            layers=list(self.layers),
            n_tokens=self.n1,
            adjacent_cosine=cos.tolist(),
            adjacent_cosine_raw=raw.tolist(),
            norm_mean=mean.tolist(),
            norm_std=std.tolist(),
            norm_min=self.norm_min.tolist(),
            norm_max=self.norm_max.tolist(),
            norm_quantiles={str(q): qs[:, k].tolist() for k, q in enumerate(QUANTILES)},
            norm_hist=self.hist.numpy().copy(),
        )


def hist_quantiles(
    hist: np.ndarray, lo: np.ndarray, hi: np.ndarray, qs: Sequence[float] = QUANTILES
) -> np.ndarray:
    """Quantiles [L, len(qs)] from per-row histograms over [lo, hi] (linear within a bin)."""
    L, B = hist.shape
    out = np.full((L, len(qs)), np.nan)
    for i in range(L):
        tot = hist[i].sum()
        if tot == 0:
            continue
        cdf = np.concatenate([[0.0], np.cumsum(hist[i]) / tot])  # [B+1] at bin edges
        edges = np.linspace(lo[i], hi[i], B + 1)
        for k, q in enumerate(qs):
            b = int(np.clip(np.searchsorted(cdf, q, side="left"), 1, B))  # bin b-1 crosses q
            c0, c1 = cdf[b - 1], cdf[b]
            f = 0.0 if c1 == c0 else (q - c0) / (c1 - c0)
            out[i, k] = edges[b - 1] + f * (edges[b] - edges[b - 1])
    return out


def residual_geometry(
    batches: Callable[[], Iterable[tuple[Tensor, Tensor | None]]],
    layers: Sequence[int],
    d_model: int,
    bins: int = 512,
) -> GeometryResult:
    """Both passes over `batches()` (called twice; must yield the same (x[n,L,d], mask))."""
    geo = ResidualGeometry(layers, d_model, bins)
    for x, m in batches():
        geo.update_pass1(x, m)
    for x, m in batches():
        geo.update_pass2(x, m)
    return geo.result()
