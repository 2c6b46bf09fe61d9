"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): a TopK SAE whose dictionary is trained
so that nested prefixes of it reconstruct on their own. With n = cfg.matryoshka_prefixes, the
prefixes hold the first d_sae / 2^(n-1), ..., d_sae / 2, d_sae latents; the loss is the sum over
prefixes of the batch FVU of the reconstruction from the code's latents inside the prefix (the
last prefix is the whole code, with AuxK as TopK). Inference is TopK's: the same code.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from mlsae.sae.autoencoder import StepOutput
from mlsae.sae.kernels import sparse_decode
from mlsae.sae.metrics import fvu
from mlsae.sae.topk import TopKSAE


class MatryoshkaSAE(TopKSAE):
    """TopK code; loss = sum over nested prefixes of their reconstructions' FVU."""

    def prefix_sizes(self) -> list[int]:
        """Latents of each nested prefix, smallest first; the last is d_sae."""
        n, m = self.cfg.matryoshka_prefixes, self.cfg.d_sae
        return [max(1, m >> (n - 1 - p)) for p in range(n)]

    def train_step_forward(
        self,
        x: Tensor,
        dead: Tensor | None = None,
        k_aux: int = 0,
        aux_coef: float = 0.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        layer: int | Tensor | None = None,
    ) -> StepOutput:
        """TopK's loss (FVU of the whole code + AuxK; `fvu` reports it) plus the FVU of each
        smaller prefix's reconstruction b_dec + sum over the code's latents below its size."""
        out = super().train_step_forward(x, dead, k_aux, aux_coef, reduce, layer)
        u, _, _ = self.normalize(x, layer)
        loss = out.loss
        for size in self.prefix_sizes()[:-1]:
            acts = out.top_acts * (out.top_indices < size)
            loss = loss + fvu(
                u, sparse_decode(acts, out.top_indices, self.W_dec) + self.b_dec, reduce
            )
        return out._replace(loss=loss)
