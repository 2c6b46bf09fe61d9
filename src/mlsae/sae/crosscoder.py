"""The acausal crosscoder (SPEC 7; Lindsey et al. 2024): one shared sparse code per token, read
from all L layers at once and written back to every layer.

Shapes: L layers (`cfg.layers`), d = d_in, F = d_sae = R * d. Parameters: encoder W_enc
[L, d, F], b_enc [F]; decoder W_dec [F, L, d] (each latent's whole [L, d] row has unit norm),
b_dec [L, d] (a decoder bias per layer). For one token with layer vectors x_0 .. x_{L-1},
each standardized on its own as every SAE here does (u_l), and K = k x L:
    pre = sum_l (u_l - b_dec[l]) @ W_enc[l] + b_enc          [F]
    f = ReLU(TopK_K(pre))                                      the shared code
    u_hat_l = f @ W_dec[:, l] + b_dec[l]                       for every layer l
That is a TopK SAE on the token's concatenated [L * d] vector, so it runs on the same kernels
(`topk_encode`: the sparse encoder backward; `sparse_decode`: the decoder as an embedding-bag
gather), with the same AuxK on the dead latents. The loss is the batch FVU of the concatenated
token vectors: the sum over layers of the squared errors over the sum over layers of each
layer's variance (about that layer's batch mean), plus aux_coef x AuxK. Matched active latents:
`-k` is per (token, layer) as for the MLSAEs, so a token keeps k x L latents in all.

The parameters are held flat ([L * d, F], [F, L * d], [L * d]: the same memory as the shapes
above) so the base class's decoder renorm and losses apply unchanged; sae.safetensors holds the
[L, d, F] / [F, L, d] / [L, d] shapes.

The stage contract (a [N, w] code per (token, layer) vector, activation 0 = inactive): `encode`
takes the L vectors of each token together, x [T * L, d] with each token's layers consecutive in
`cfg.layers` order (a row alone has no code). Row (t, l) gets the token's shared code with each
activation scaled by that latent's decoder norm at layer l:
    a[t, l, i] = f[t, i] * ||W_dec[i, l]||
i.e. the norm of the latent's contribution to layer l's reconstruction (for the other
architectures, whose decoder rows have unit norm, the activation is that norm too). "Latent i is
active at layer l for token t" means a[t, l, i] > 0: f[t, i] > 0 and a non-zero decoder at l.
`decode` of those rows is exactly u_hat_l. Where a latent lives is its decoder-norm share,
`layer_share()`: ||W_dec[i, l]|| / sum_l' ||W_dec[i, l']||.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import (
    ENCODE_CHUNK,
    EncoderOutput,
    SparseAutoencoder,
    StepOutput,
    aux_dead,
    geometric_median,
)
from mlsae.sae.encoder import AUX_SPARSE_RATIO, topk_encode
from mlsae.sae.kernels import sparse_decode

__all__ = ["CrosscoderSAE", "LayerShareSummary"]

SINGLE_LAYER_SHARE = 0.9
"""A latent "lives at one layer" when one layer holds more than this part of its decoder norms."""


@dataclass
class LayerShareSummary:
    """Where a crosscoder's latents live, from each latent's decoder-norm share over the layers
    (`CrosscoderSAE.layer_share`); `mlsae analyze` reports it as `layer_share`."""

    layers: list[int]
    mean_share: list[float]
    """Per layer: the mean over latents of its share (sums to 1 over the layers)."""
    peak_latents: list[int]
    """Per layer: the latents whose largest share is at that layer."""
    effective_layers: float
    """Mean over latents of 1 / sum_l share_l^2: 1 for a latent writing to one layer, L for one
    writing equally to all."""
    single_layer_fraction: float
    """Latents with more than SINGLE_LAYER_SHARE of their decoder norms at one layer."""


class CrosscoderSAE(SparseAutoencoder):
    """One TopK code of k x L latents per token over its L layer vectors."""

    token_grouped = True
    token_code = True

    def __init__(
        self,
        cfg: SaeConfig,
        seed: int = 0,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(cfg, seed, compute_dtype)
        n_l, d, m = self.n_layers, cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(n_l * d)
        w = torch.rand(n_l * d, m, generator=gen).mul_(2 * bound).sub_(bound)
        self.W_enc = nn.Parameter(w)  # [L d, F] = [L, d, F]
        self.W_dec = nn.Parameter(w.t().contiguous())  # [F, L d] = [F, L, d], unit rows
        self.b_dec = nn.Parameter(torch.zeros(n_l * d))  # [L d] = [L, d]
        self.normalize_decoder_()
        if device is not None:
            self.to(device)

    @property
    def n_layers(self) -> int:
        """L, the layers of one token's code."""
        return max(1, len(self.cfg.layers))

    @property
    def code_width(self) -> int:
        """K = k x L: the latents of a token's shared code (every row of the token gets them)."""
        return min(self.cfg.d_sae, self.cfg.k * self.n_layers)

    def _tokens(self, n: int) -> int:
        if n % self.n_layers:
            raise MlsaeError(
                f"a crosscoder over {self.n_layers} layers reads whole tokens: {n} vectors is not "
                f"a multiple of {self.n_layers} (each token's layer vectors together, in order)"
            )
        return n // self.n_layers

    # ------------------------------------------------------------------ the shared code

    def shared_code(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized rows u [T * L, d] (whole tokens) -> the shared code (acts f32[T, K],
        idx i64[T, K]), in chunks of tokens without autograd."""
        t = self._tokens(len(u))
        ut = u.reshape(t, -1)  # [T, L d]
        step = t if torch.is_grad_enabled() else max(1, ENCODE_CHUNK // self.n_layers)
        parts = [
            topk_encode(
                ut[i : i + step],
                self.b_dec,
                self.W_enc,
                self.b_enc,
                self.code_width,
                self.compute_dtype,
            )
            for i in range(0, t, step)
        ]
        if len(parts) == 1:
            return parts[0].acts, parts[0].idx
        return torch.cat([p.acts for p in parts]), torch.cat([p.idx for p in parts])

    def encode_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw x [T * L, d] (each token's layers consecutive) -> the shared code f of each token
        (acts f32[T, K], idx i64[T, K])."""
        return self.shared_code(self.normalize(x)[0])

    def decoder_norms(self) -> Tensor:
        """||W_dec[i, l]|| as f32[F, L]."""
        m, n_l = self.cfg.d_sae, self.n_layers
        return torch.linalg.vector_norm(self.W_dec.detach().view(m, n_l, -1), dim=2)

    def layer_share(self) -> Tensor:
        """Where each latent lives: ||W_dec[i, l]|| / sum_l' ||W_dec[i, l']|| as f32[F, L]."""
        norms = self.decoder_norms()
        return norms / norms.sum(1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)

    def layer_share_summary(self) -> LayerShareSummary:
        """The summary of `layer_share` over all latents."""
        share = self.layer_share().cpu().double()  # [F, L]
        peak = torch.bincount(share.argmax(1), minlength=self.n_layers)
        return LayerShareSummary(
            layers=[int(x) for x in self.cfg.layers] or [0],
            mean_share=share.mean(0).tolist(),
            peak_latents=[int(c) for c in peak],
            effective_layers=float((1 / share.pow(2).sum(1).clamp_min(1e-12)).mean()),
            single_layer_fraction=float((share.max(1).values > SINGLE_LAYER_SHARE).double().mean()),
        )

    # ------------------------------------------------------------------ the stage contract

    def encode_normalized(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Rows (t, l) of u [T * L, d] -> (a [T * L, K], idx [T * L, K]): the token's shared code,
        each activation times the latent's decoder norm at layer l."""
        acts, idx = self.shared_code(u)  # [T, K]
        norms = self.decoder_norms().to(acts.device)  # [F, L]
        scaled = acts.unsqueeze(1) * norms[idx].transpose(1, 2)  # [T, L, K]
        t, k = acts.shape
        rows = idx.unsqueeze(1).expand(t, self.n_layers, k)
        return scaled.reshape(-1, k), rows.reshape(-1, k)

    def encode(self, x: Tensor, layer: int | Tensor | None = None) -> EncoderOutput:
        """Raw x [T * L, d] (whole tokens, layers in `cfg.layers` order) -> the EncoderOutput of
        each (token, layer) row (module docstring). `layer` is not needed: the rows' order says
        their blocks."""
        u, mean, std = self.normalize(x)
        acts, idx = self.encode_normalized(u)
        return EncoderOutput(acts, idx, mean, std)

    def decode_normalized(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Rows (t, l) in order: u_hat_l = sum_s a_s W_dec[i_s, l] / ||W_dec[i_s, l]|| + b_dec[l]
        (= f @ W_dec[:, l] + b_dec[l] for `encode`'s code), a gather of W_dec's [F L, d] rows."""
        n_l, m = self.n_layers, self.cfg.d_sae
        self._tokens(len(top_acts))
        layer = torch.arange(len(top_acts), device=top_acts.device) % n_l  # [N]
        norms = self.decoder_norms()[top_indices, layer.unsqueeze(1)]  # [N, w]
        weights = top_acts / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        rows = top_indices * n_l + layer.unsqueeze(1)  # row i * L + l of W_dec [F L, d]
        out = sparse_decode(weights, rows, self.W_dec.view(m * n_l, -1))
        return out + self.b_dec.view(n_l, -1)[layer]

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, layer: int | Tensor | None = None) -> None:
        """b_dec = the geometric median of the batch's normalized token vectors [T, L d]."""
        self.init_b_dec_from(self.normalize(x)[0])

    @torch.no_grad()
    def init_b_dec_from(self, u: Tensor) -> None:
        self.b_dec.copy_(geometric_median(u.reshape(self._tokens(len(u)), -1)))

    def train_step_forward(
        self,
        x: Tensor,
        dead: Tensor | None = None,
        k_aux: int = 0,
        aux_coef: float = 0.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        layer: int | Tensor | None = None,
    ) -> StepOutput:
        """Batch FVU of the token vectors plus aux_coef * AuxK (TopK's, on the concatenated
        token vectors); x [T * L, d], whole tokens. top_acts / top_indices: the shared code
        [T, K] (the dead-latent counter counts tokens)."""
        u = self.normalize(x)[0]
        ut = u.reshape(self._tokens(len(u)), -1)  # [T, L d]
        dead = aux_dead(dead, k_aux, aux_coef)
        sparse_aux = dead is not None and dead.numel() > AUX_SPARSE_RATIO * k_aux
        enc = topk_encode(
            ut,
            self.b_dec,
            self.W_enc,
            self.b_enc,
            self.code_width,
            self.compute_dtype,
            dead,
            k_aux if sparse_aux else 0,
        )
        return self.reconstruction_loss(ut, enc, dead, k_aux, aux_coef, reduce)

    # ------------------------------------------------------------------ files

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        n_l, d, m = self.n_layers, self.cfg.d_in, self.cfg.d_sae
        return {"W_enc": (n_l, d, m), "b_enc": (m,), "W_dec": (m, n_l, d), "b_dec": (n_l, d)}

    def state_tensors(self) -> dict[str, Tensor]:
        return {
            n: getattr(self, n).detach().to("cpu", torch.float32).reshape(shape).clone()
            for n, shape in self.tensor_shapes().items()
        }


def token_pass(
    sae: SparseAutoencoder, layers: Sequence[int], inputs: Callable[[int], Tensor]
) -> dict[int, tuple[Tensor, EncoderOutput]]:
    """The stages' per-layer loops (evaluate, --replace) and a token-coded SAE (`token_code`: the
    crosscoder), which reads all its layers at once: inputs(layer) -> its SAE inputs [N, d] for
    each of `layers` (the SAE's own, all of them) -> layer -> (x_hat [N, d], code) of its rows.
    {} for the other SAEs (each layer is encoded on its own)."""
    if not sae.token_code:
        return {}
    if [int(x) for x in layers] != [int(x) for x in sae.cfg.layers]:
        raise MlsaeError(
            f"a {sae.cfg.architecture} reads all the layers it was trained on "
            f"({sae.cfg.layers}) at once, not {list(layers)}"
        )
    xs = [inputs(layer) for layer in layers]
    x_hat, enc = sae(torch.stack(xs, 1).reshape(-1, xs[0].shape[-1]))  # token t, layer i: t L + i
    n_l = len(xs)
    return {layer: (x_hat[i::n_l], enc.rows(slice(i, None, n_l))) for i, layer in enumerate(layers)}
