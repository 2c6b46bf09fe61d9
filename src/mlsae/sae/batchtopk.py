"""BatchTopK (Bussmann et al. 2024): training keeps the k x N largest pre-activations of a batch
of N vectors together, so one vector may get more than k latents and another fewer (k per vector
on average); inference keeps, in each vector alone, the pre-activations above a threshold
learned during training (the running average of the smallest kept activation, as SAELens does),
at most CODE_WIDTH x k of them.

`ThresholdSAE` is the shared part: a selection over a group of vectors in training, the
threshold at inference. `mlsae.sae.token_topk` selects over one token's layers instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mlsae.sae.autoencoder import SparseAutoencoder, StepOutput, aux_dead
from mlsae.sae.encoder import masked_code, select_encode
from mlsae.sae.kernels import topk

CODE_WIDTH = 4
"""Inference keeps at most CODE_WIDTH x k latents per vector (its largest above the threshold), so
every `encode` returns codes of one width (`code_width`) that later stages can stack."""
THRESHOLD_RATE = 0.01
"""Weight of each training batch's smallest kept activation in the threshold's running average."""


class ThresholdSAE(SparseAutoencoder):
    """A code chosen over groups of vectors in training (`train_select`), by a learned threshold
    at inference. Buffer `threshold` [1]: -1 until the first training step."""

    threshold: Tensor

    def extra_tensors(self) -> dict[str, Tensor]:
        return {"threshold": torch.full((1,), -1.0)}

    def train_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The training selection of pre-activations [N, m] -> (idx [N, w], keep [N, w])."""
        raise NotImplementedError

    @property
    def code_width(self) -> int:
        return min(self.cfg.d_sae, CODE_WIDTH * self.cfg.k)

    def threshold_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Inference: each row's latents whose pre-activation exceeds the threshold (and 0), at
        most `code_width` of them (the largest)."""
        return masked_code(pre, pre > float(self.threshold.clamp_min(0)), self.code_width)

    def encode_normalized(self, u: Tensor) -> tuple[Tensor, Tensor]:
        enc = select_encode(
            u, self.b_dec, self.W_enc, self.b_enc, self.threshold_select, self.compute_dtype
        )
        return enc.acts, enc.idx

    def train_step_forward(
        self,
        x: Tensor,
        dead: Tensor | None = None,
        k_aux: int = 0,
        aux_coef: float = 0.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        layer: int | Tensor | None = None,
    ) -> StepOutput:
        """Batch FVU plus aux_coef * AuxK (dense over the dead columns) of the training
        selection's code; updates the threshold from this batch's smallest kept activation."""
        u, _, _ = self.normalize(x, layer)
        dead = aux_dead(dead, k_aux, aux_coef)
        enc = select_encode(
            u, self.b_dec, self.W_enc, self.b_enc, self.train_select, self.compute_dtype, dead
        )
        self.update_threshold(enc.acts, reduce)
        return self.reconstruction_loss(u, enc, dead, k_aux, aux_coef, reduce)

    @torch.no_grad()
    def update_threshold(
        self, acts: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """threshold <- (1 - r) threshold + r * (the smallest positive kept activation), r =
        THRESHOLD_RATE (the first batch sets it). Data-parallel: the processes' mean."""
        pos = acts.detach()[acts.detach() > 0]
        got = torch.stack(
            [pos.min() if len(pos) else acts.new_zeros(()), acts.new_tensor(len(pos) > 0)]
        )
        got = got.double().cpu()
        if reduce is not None:
            reduce(got)
        if got[1] == 0:
            return
        value = float(got[0] / got[1])
        old = float(self.threshold)
        new = value if old < 0 else (1 - THRESHOLD_RATE) * old + THRESHOLD_RATE * value
        self.threshold.fill_(new)


class BatchTopKSAE(ThresholdSAE):
    """Training: the k x N largest pre-activations of the batch (N vectors) together."""

    def train_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        n, m = pre.shape
        _, flat = topk(pre.reshape(1, n * m), min(self.cfg.k * n, n * m))
        mask = torch.zeros(n * m, dtype=torch.bool, device=pre.device)
        return masked_code(pre, mask.index_fill_(0, flat.view(-1), True).view(n, m))
