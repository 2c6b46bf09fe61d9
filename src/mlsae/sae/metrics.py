"""Reconstruction metrics (SPEC section 3). The one implementation of FVU, used by training,
evaluation, analysis and the app alike.

`fvu` is the batch FVU (training loss). `LayerMetrics` is the streaming evaluation accumulator:
per layer, memory independent of the number of tokens, fed only with used (non-special) vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mlsae.core.errors import MlsaeError


def fvu(x: Tensor, x_hat: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Fraction of variance unexplained of a batch: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

    x, x_hat: [N, d]. The mean is per dimension over the N vectors (never one scalar grand mean).
    reduce: data-parallel training, where the batch is split over processes and `reduce` sums a
    tensor over them in place. The denominator is then the global batch's (its per-dimension
    mean and total variance, summed over processes; it does not depend on the parameters) and
    the numerator this process's share, so the values returned by the processes, and their
    gradients, sum to the FVU of the global batch and its gradient: the same math as one
    process on the whole batch, not a mean of per-process FVUs.
    """
    # fused ops (the same values and gradients as the squares summed, without temporaries)
    err = F.mse_loss(x_hat, x, reduction="sum")
    if reduce is None:
        total = F.mse_loss(x, x.mean(dim=0, keepdim=True).expand_as(x), reduction="sum")
    else:
        with torch.no_grad():
            xd = x.detach()
            s = torch.cat([xd.sum(0), xd.new_full((1,), xd.shape[0])]).to("cpu", torch.float64)
            reduce(s)  # [sum x (d), N] of the global batch
            mean = (s[:-1] / s[-1].clamp_min(1)).to(xd.device, xd.dtype)
            total = F.mse_loss(xd, mean.expand_as(xd), reduction="sum")
            total = total.to("cpu", torch.float64).reshape(1)
            reduce(total)
            total = total[0].to(err.device, err.dtype)
    return err / total.clamp_min(torch.finfo(total.dtype).tiny)


class _Moments:
    """Streaming per-dimension count, mean and sum of squared deviations (float64).

    Batches are merged with Chan et al.'s parallel update, the numerically stable equivalent of
    accumulating sum x and sum x^2 per dimension (no cancellation when |mean| >> std).
    """

    def __init__(self, d: int) -> None:
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)  # [d]
        self.m2 = torch.zeros(d, dtype=torch.float64)  # [d] sum_t (x - mean)^2

    def update(self, x: Tensor) -> None:
        """x: [N, d]."""
        nb = x.shape[0]
        if nb == 0:
            return
        x = x.detach().to("cpu", torch.float64)
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0)
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2_b + delta.pow(2) * (self.n * nb / n)
        self.n = n

    @property
    def total_variance(self) -> float:
        """sum_t ||x_t - mean_t x||^2 with the per-dimension mean."""
        return float(self.m2.sum())


class LayerMetrics:
    """Streaming evaluation metrics for one SAE over some layers (SPEC section 3).

    Per layer: FVU (per-dimension mean over that layer's evaluated vectors), MSE (mean squared
    error per element), L0 (mean number of active latents per vector), and delta CE / KL sums
    fed from splicing. Latent activity counts per layer give the dead fraction. Only feed
    used (non-special) positions.
    """

    def __init__(self, layers: Sequence[int], d_in: int, d_sae: int) -> None:
        self.layers = [int(x) for x in layers]
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self.d_in, self.d_sae = d_in, d_sae
        self.moments = [_Moments(d_in) for _ in self.layers]
        n = len(self.layers)
        self.sq_err = torch.zeros(n, dtype=torch.float64)  # [L] sum_t ||x - x_hat||^2
        self.active = torch.zeros(n, dtype=torch.float64)  # [L] sum_t #active latents
        self.counts = torch.zeros(n, d_sae, dtype=torch.int64)  # [L, d_sae] vectors active on
        self.ce_sum = torch.zeros(n, dtype=torch.float64)  # [L] sum over predicted positions
        self.kl_sum = torch.zeros(n, dtype=torch.float64)
        self.n_pred = torch.zeros(n, dtype=torch.int64)

    def _index(self, layer: int) -> int:
        if layer not in self._row:
            raise MlsaeError(f"layer {layer} is not among the evaluated layers {self.layers}")
        return self._row[layer]

    def update(
        self,
        layer: int,
        x: Tensor,
        x_hat: Tensor,
        top_indices: Tensor | None = None,
        top_acts: Tensor | None = None,
    ) -> None:
        """Add vectors of one layer. x, x_hat: [N, d_in] raw space; top_indices/top_acts:
        [N, k] the SAE's TopK output (a latent counts as active where its value is > 0)."""
        i = self._index(layer)
        if x.shape != x_hat.shape or x.ndim != 2 or x.shape[1] != self.d_in:
            raise MlsaeError(f"expected x and x_hat of shape [N, {self.d_in}], got {x.shape}")
        x, x_hat = (t.detach().to("cpu", torch.float64) for t in (x, x_hat))  # any device
        self.moments[i].update(x)
        self.sq_err[i] += float((x - x_hat).pow(2).sum())
        if top_indices is not None:
            top_indices = top_indices.cpu()
            on = (
                top_acts.cpu() > 0
                if top_acts is not None
                else torch.ones_like(top_indices, dtype=torch.bool)
            )
            self.active[i] += float(on.sum())
            idx = top_indices[on].reshape(-1).cpu()
            self.counts[i] += torch.bincount(idx, minlength=self.d_sae)

    def update_splice(self, layer: int, ce_sum: float, kl_sum: float, n: int) -> None:
        """Add delta CE and KL summed over n predicted positions of one layer."""
        i = self._index(layer)
        self.ce_sum[i] += ce_sum
        self.kl_sum[i] += kl_sum
        self.n_pred[i] += n

    @property
    def n_tokens(self) -> int:
        """Vectors seen per layer (the maximum over layers; equal when fed a whole stream)."""
        return max((m.n for m in self.moments), default=0)

    def per_layer(self) -> dict[str, list[float | None]]:
        """fvu, mse, l0, delta_ce, kl per layer (None where nothing was measured)."""
        out: dict[str, list[float | None]] = {k: [] for k in ("fvu", "mse", "l0", "delta_ce", "kl")}
        for i, m in enumerate(self.moments):
            n = m.n
            tv = m.total_variance
            out["fvu"].append(float(self.sq_err[i]) / tv if n and tv > 0 else None)
            out["mse"].append(float(self.sq_err[i]) / (n * self.d_in) if n else None)
            out["l0"].append(float(self.active[i]) / n if n else None)
            p = int(self.n_pred[i])
            out["delta_ce"].append(float(self.ce_sum[i]) / p if p else None)
            out["kl"].append(float(self.kl_sum[i]) / p if p else None)
        return out

    def dead_fraction(self, layers: Sequence[int] | None = None) -> float:
        """Fraction of latents never active on any evaluated vector of `layers` (default all)."""
        rows = [self._index(x) for x in (layers if layers is not None else self.layers)]
        return float((self.counts[rows].sum(0) == 0).double().mean())

    def result(self) -> MetricsResult:
        """The metrics per layer, their means over layers, the dead fraction and the token
        count (final_fvu.json's value of one SAE is its `to_dict`)."""
        per = self.per_layer()
        return MetricsResult(
            layers=list(self.layers),
            per_layer=per,
            mean={k: mean_or_none(v) for k, v in per.items()},
            dead_fraction=self.dead_fraction(),
            n_tokens=self.n_tokens,
        )


@dataclass
class MetricsResult:
    """One SAE's streaming metrics (`LayerMetrics.result`): what training's final_fvu.json
    holds per SAE."""

    layers: list[int]
    """Block index of each layer."""
    per_layer: dict[str, list[float | None]]
    """fvu, mse, l0, delta_ce, kl: one value per layer (None where nothing was measured)."""
    mean: dict[str, float | None]
    """Each metric's mean over the layers that have one (None if none has)."""
    dead_fraction: float
    """Latents never active on any layer / all latents."""
    n_tokens: int


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the measured values (None entries and NaN skipped); None if there are none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None
