"""BatchTopK (Bussmann et al. 2024): training keeps the k x N largest pre-activations of a batch
of N vectors together, so one vector may get more than k latents and another fewer (k per vector
on average); inference keeps, in each vector alone, the pre-activations above a threshold, at
most CODE_WIDTH x k of them.

The threshold is calibrated, not learned: `ThresholdCalibration` sets it from the final weights on
a sample of training vectors so that inference keeps exactly k latents per vector on average over
that sample (the (k x N)-th largest of the capped codes' pre-activations: what the training rule
keeps over one batch of N). The trainer calibrates at every save (checkpoints and the end of
training, `mlsae.train.calibrate`). SAELens and dictionary_learning instead keep a running average
of each batch's smallest kept activation; after a short training that average still lags the
weights, and for per-token TopK (the smallest kept over all tokens of a batch) it is biased low
even at convergence: it kept 29.6 and 51.1 latents per vector instead of 16 (docs/architectures.md).

`ThresholdSAE` is the shared part: a selection over a group of vectors in training, the
threshold at inference. `mlsae.sae.token_topk` selects over one token's layers instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import ENCODE_CHUNK, SparseAutoencoder, StepOutput, aux_dead
from mlsae.sae.encoder import masked_code, select_encode
from mlsae.sae.kernels import topk

CODE_WIDTH = 4
"""Inference keeps at most CODE_WIDTH x k latents per vector (its largest above the threshold), so
every `encode` returns codes of one width (`code_width`) that later stages can stack."""


class ThresholdSAE(SparseAutoencoder):
    """A code chosen over groups of vectors in training (`train_select`), by a threshold at
    inference. Buffer `threshold` [1]: -1 until calibrated (`ThresholdCalibration`); SAEs saved
    before calibration existed hold a running average of the smallest kept activation."""

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
        selection's code. The threshold is not touched (`calibration` sets it)."""
        u, _, _ = self.normalize(x, layer)
        dead = aux_dead(dead, k_aux, aux_coef)
        enc = select_encode(
            u, self.b_dec, self.W_enc, self.b_enc, self.train_select, self.compute_dtype, dead
        )
        return self.reconstruction_loss(u, enc, dead, k_aux, aux_coef, reduce)

    def calibration(self) -> ThresholdCalibration:
        """A calibration of this SAE's threshold: `add` training vectors, then `finish`."""
        return ThresholdCalibration(self)

    def row_tops(self, u: Tensor) -> Tensor:
        """ReLU of each normalized row's `code_width` largest pre-activations: [N, code_width]
        (the encoder's own matmul, in its compute dtype)."""

        def largest(pre: Tensor) -> tuple[Tensor, Tensor]:
            idx = topk(pre, self.code_width)[1]
            return idx, torch.ones_like(idx, dtype=torch.bool)

        return select_encode(
            u, self.b_dec, self.W_enc, self.b_enc, largest, self.compute_dtype
        ).acts


class ThresholdCalibration:
    """Sets a threshold SAE's `threshold` so that its inference code keeps k latents per vector
    on average over the vectors added (exactly, when no two candidate values tie).

    A row keeps its pre-activations above the threshold t (and 0), at most w = `code_width` of
    them, so it keeps as many as its w largest pre-activations exceed t: over the sample, the
    count is that of the pooled rows' w largest values above t. t is midway between the
    (k N)-th and (k N + 1)-th largest of those pooled values (N = rows added), or 0 if fewer
    than k N of them are positive. Without the cap this is the (k N)-th largest pre-activation
    of the sample: the threshold that BatchTopK's training selection over one batch of all N
    rows would apply."""

    def __init__(self, sae: ThresholdSAE) -> None:
        self.sae = sae
        self.tops: list[Tensor] = []
        self.rows = 0

    @torch.no_grad()
    def add(self, x: Tensor, layer: int | Tensor | None = None) -> None:
        """Raw vectors x [N, d_in] (and their blocks, for per-layer centring)."""
        u, _, _ = self.sae.normalize(x, layer)
        for i in range(0, len(u), ENCODE_CHUNK):
            self.tops.append(self.sae.row_tops(u[i : i + ENCODE_CHUNK]).reshape(-1).cpu())
        self.rows += len(u)

    @torch.no_grad()
    def finish(self) -> float:
        """Set the SAE's threshold (MlsaeError if no vector was added); returns it."""
        if not self.rows:
            raise MlsaeError("no vectors to calibrate the inference threshold on")
        t = count_threshold(torch.cat(self.tops), self.sae.cfg.k * self.rows)
        self.sae.threshold.fill_(t)
        return t


def count_threshold(values: Tensor, count: int) -> float:
    """The threshold t >= 0 with exactly `count` of `values` (1-D) above it: midway between the
    count-th and (count + 1)-th largest value (exact unless they are equal); 0 when fewer than
    `count` values are positive."""
    if count >= values.numel():
        return 0.0
    top = torch.topk(values.double(), count + 1).values  # descending
    if count == 0:
        return float(top[0])
    return max(0.0, float((top[count - 1] + top[count]) / 2))


class BatchTopKSAE(ThresholdSAE):
    """Training: the k x N largest pre-activations of the batch (N vectors) together."""

    def train_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        n, m = pre.shape
        _, flat = topk(pre.reshape(1, n * m), min(self.cfg.k * n, n * m))
        mask = torch.zeros(n * m, dtype=torch.bool, device=pre.device)
        return masked_code(pre, mask.index_fill_(0, flat.view(-1), True).view(n, m))
