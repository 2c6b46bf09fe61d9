"""Reconstruction metrics (SPEC section 3). The one implementation of FVU, used by training,
evaluation, analysis and the app alike."""

from __future__ import annotations

import torch
from torch import Tensor


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained of a batch: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

    x, x_hat: [N, d]. The mean is per dimension over the N vectors (never one scalar grand mean).
    """
    err = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return err / total.clamp_min(torch.finfo(total.dtype).tiny)
