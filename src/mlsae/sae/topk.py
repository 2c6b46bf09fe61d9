"""The TopK SAE (SPEC section 2): each vector keeps its k largest pre-activations (ReLU'd).

Training loss: batch FVU plus aux_coef * AuxK on the dead latents. The encoder is
`mlsae.sae.encoder.topk_encode` (row tiles and a native top-k on the CPU, a sparse backward).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from mlsae.sae.autoencoder import SparseAutoencoder, StepOutput, aux_dead
from mlsae.sae.encoder import AUX_SPARSE_RATIO, topk_encode

__all__ = ["TopKSAE"]


class TopKSAE(SparseAutoencoder):
    """z = ReLU(TopK_k(pre)): exactly k entries per vector (some may be 0 after the ReLU)."""

    def encode_normalized(self, u: Tensor) -> tuple[Tensor, Tensor]:
        enc = topk_encode(u, self.b_dec, self.W_enc, self.b_enc, self.cfg.k, self.compute_dtype)
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
        """Batch FVU of u plus aux_coef * AuxK (`SparseAutoencoder.reconstruction_loss`); many
        dead latents (beyond AUX_SPARSE_RATIO per k_aux): AuxK's k_aux per row as sparse
        entries gathered in the top-k pass (cost independent of the dead latents)."""
        u, _, _ = self.normalize(x, layer)
        dead = aux_dead(dead, k_aux, aux_coef)
        sparse_aux = dead is not None and dead.numel() > AUX_SPARSE_RATIO * k_aux
        enc = topk_encode(
            u,
            self.b_dec,
            self.W_enc,
            self.b_enc,
            self.cfg.k,
            self.compute_dtype,
            dead,
            k_aux if sparse_aux else 0,
        )
        return self.reconstruction_loss(u, enc, dead, k_aux, aux_coef, reduce)
