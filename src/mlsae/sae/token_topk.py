"""Per-token TopK over layers (new here): for one token, the k x L largest pre-activations of its
L layer vectors together. A latent may then fire at every layer of a token or at one, and the
data decide how the token's k x L active latents spread over its layers (TopK fixes k per layer
vector). Training needs batches holding all L layers of each token, consecutive in the run's
layer order (`ActivationSource.shuffled(group_tokens=True)`); inference, which sees one vector
at a time, keeps the pre-activations above a threshold calibrated on training vectors to keep k
per vector on average, as BatchTopK does (`mlsae.sae.batchtopk.ThresholdCalibration`;
`encode_grouped` gives the exact per-token selection of whole tokens). With one layer it is the
TopK SAE (k per vector) with a threshold at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import EncoderOutput
from mlsae.sae.batchtopk import ThresholdSAE
from mlsae.sae.encoder import masked_code, select_encode
from mlsae.sae.kernels import topk


class TokenTopKSAE(ThresholdSAE):
    """Training: per token, the k x L largest of its L vectors' pre-activations together."""

    token_grouped = True

    @property
    def n_layers(self) -> int:
        return max(1, len(self.cfg.layers))

    def train_select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        n, m = pre.shape
        n_l = self.n_layers
        if n % n_l:
            raise MlsaeError(
                f"a per-token TopK SAE over {n_l} layers needs batches of whole tokens: "
                f"{n} vectors is not a multiple of {n_l} (choose --batch-tokens accordingly)"
            )
        t = n // n_l
        _, flat = topk(pre.reshape(t, n_l * m), self.cfg.k * n_l)  # [T, k L] of (layer, latent)
        mask = torch.zeros(t, n_l * m, dtype=torch.bool, device=pre.device)
        return masked_code(pre, mask.scatter_(1, flat, True).view(n, m))

    def encode_grouped(self, x: Tensor, layer: int | Tensor | None = None) -> EncoderOutput:
        """The training selection at inference: x [T * L, d_in], each token's L layer vectors
        consecutive -> its EncoderOutput (rows as x)."""
        u, mean, std = self.standardize(x)
        center = self.block_center(layer, len(u))
        u = u if center is None else u - center
        enc = select_encode(
            u, self.b_dec, self.W_enc, self.b_enc, self.train_select, self.compute_dtype
        )
        return EncoderOutput(enc.acts, enc.idx, mean, std, center)
