"""The SAE base class (SPEC section 2): what every architecture shares, and the contract that
every later stage relies on. An architecture (`mlsae.sae.registry`) is a subclass that says how
the sparse code is chosen and trained; `SparseAutoencoder(cfg)` builds `cfg.architecture`'s class.

The contract (docs/architectures.md; tests/test_architectures.py checks it for each one):
- `encode(x [N, d_in])` -> EncoderOutput: the sparse code of each row as (top_acts f32[N, w] >= 0,
  top_indices i64[N, w]) with w = `code_width` in every call (k for TopK, a cap for a threshold
  code), an activation of 0 meaning "inactive", distinct indices within a row. It depends on
  each row alone (no batch statistics at inference).
- `decode(enc)` = sum of top_acts x W_dec rows + b_dec, mapped back to the raw space: the
  reconstruction is linear in the code, with unit-norm decoder rows.
- `train_step_forward(x, dead, k_aux, aux_coef, reduce)` -> StepOutput: the training loss owns
  its auxiliary terms (AuxK, Matryoshka prefixes, ...) and may update buffers (thresholds).
- `tensor_shapes()`: the tensors of sae.safetensors (W_enc, b_enc, W_dec, b_dec, then the
  architecture's own buffers); `state_tensors()` / `save` write them, `load_sae` checks them.

The TopK SAE (mlsae.sae.topk) computes:

Shapes: d = d_in, m = d_sae = R * d. Parameters (fp32 master weights): W_enc [d, m], b_enc [m],
W_dec [m, d] (unit-norm rows), b_dec [d]. For a raw vector x:
    u = (x - mean_d(x)) / (std_d(x) + 1e-5)      (normalize="standardize"; u = x for "none";
                                                  std is torch's default, with Bessel correction)
    pre = (u - b_dec) @ W_enc + b_enc ; z = ReLU(TopK_k(pre))
    u_hat = z @ W_dec + b_dec ; x_hat = u_hat * (std + 1e-5) + mean   (the exact inverse)
normalize="layer_norm" encodes like "standardize" but maps back with x_hat = u_hat * std + mean
(no +1e-5): SAELens's "layer_norm" mode and the paper's code (tim-lawson/mlsae) do this, so
SAEs imported from them, or exported to SAELens, reproduce exactly.
Per-layer centring (cfg.center_layers, mlsae.sae.centring): u is replaced by u - mu_l before the
encoder and mu_l is added back to u_hat, where mu_l (buffer `layer_means` [L, d], row i for block
cfg.layers[i]) is block l's mean of u over training data. It is exactly a per-block b_dec, so
encode / decode / forward take the block of each row (`layer`: an int or i64[N]).
The heavy lifting is in `mlsae.sae.kernels` (sparse decoder, sparse encoder gradient, top-k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mlsae.core.compute import resolve_compute_dtype
from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, write_json, write_safetensors
from mlsae.sae.encoder import Encoded
from mlsae.sae.kernels import sparse_decode, sparse_decode_aux
from mlsae.sae.metrics import fvu

STD_EPS = 1e-5
NORMALIZE_MODES = ("standardize", "layer_norm", "none")
ENCODE_CHUNK = 8192
"""Rows per encoder pass without autograd (bounds the dense pre-activation memory)."""
SAE_CFG, SAE_WEIGHTS = "cfg.json", "sae.safetensors"
"""The two files of an SAE folder (mlsae.sae.folders reads them)."""


class EncoderOutput(NamedTuple):
    """Sparse code of a batch; mean/std map reconstructions back to the raw space."""

    top_acts: Tensor  # f32[N, k] >= 0
    top_indices: Tensor  # i64[N, k]
    mean: Tensor  # f32[N, 1] (zeros for normalize="none")
    std: Tensor  # f32[N, 1] the scale decode multiplies by: std + 1e-5 ("standardize"), std
    # ("layer_norm"), ones ("none")
    center: Tensor | None = None  # f32[N, d] each row's block mean mu_l (per-layer centring)

    def rows(self, sel: Tensor | slice) -> EncoderOutput:
        """The code of the selected rows (a mask, indices or a slice)."""
        center = None if self.center is None else self.center[sel]
        return EncoderOutput(
            self.top_acts[sel], self.top_indices[sel], self.mean[sel], self.std[sel], center
        )

    def to(self, device: torch.device | str) -> EncoderOutput:
        """The same code on another device (e.g. the CPU, for statistics and files)."""
        center = None if self.center is None else self.center.to(device)
        return EncoderOutput(
            self.top_acts.to(device),
            self.top_indices.to(device),
            self.mean.to(device),
            self.std.to(device),
            center,
        )


class StepOutput(NamedTuple):
    """Training forward of one batch (normalized space)."""

    loss: Tensor  # scalar: fvu + aux_coef * auxk
    fvu: Tensor  # scalar, batch FVU of u
    auxk: Tensor  # scalar, 0 when no latent is dead
    top_acts: Tensor  # [N, k]
    top_indices: Tensor  # [N, k]


def geometric_median(points: Tensor, iters: int = 200, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows
    of points [N, d] (computed in float64) -> [d]."""
    x = points.detach().to("cpu", torch.float64)  # float64 on the CPU: any device, one result
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)  # [N]
        y_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_new
        if done:
            break
    return y.to(points.device, points.dtype)


def aux_dead(dead: Tensor | None, k_aux: int, aux_coef: float) -> Tensor | None:
    """The dead latents AuxK takes (`train_step_forward`'s arguments), or None when AuxK is
    off: no dead latent, k_aux 0 or a zero weight."""
    if dead is None or dead.numel() == 0 or k_aux <= 0 or aux_coef == 0:
        return None
    return dead


class SparseAutoencoder(nn.Module):
    """The SAE base class: input standardization, unit-norm decoder rows, the sparse decoder,
    files. Subclasses (one per architecture, `mlsae.sae.registry`) implement `encode_normalized`
    and `train_step_forward`, and may declare buffers saved with the weights (`extra_tensors`).
    `SparseAutoencoder(cfg, ...)` builds the class of `cfg.architecture`."""

    token_grouped = False
    """Whether training needs batches holding all layers of each token, consecutive
    (`ActivationSource.shuffled(group_tokens=True)`)."""
    token_code = False
    """Whether `encode` / `decode` take whole tokens: x [T * L, d_in], each token's L layer vectors
    consecutive in `cfg.layers` order (the crosscoder: one code per token)."""

    def __new__(cls, cfg: SaeConfig, *args: object, **kwargs: object) -> SparseAutoencoder:
        if cls is not SparseAutoencoder:  # a subclass named directly
            return super().__new__(cls)
        from mlsae.sae.registry import sae_class

        return nn.Module.__new__(sae_class(cfg.architecture))

    def __init__(
        self,
        cfg: SaeConfig,
        seed: int = 0,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d_in, cfg.d_sae
        self.compute_dtype = compute_dtype or resolve_compute_dtype(
            "auto", verbose=False, device=device
        )
        gen = torch.Generator().manual_seed(int(seed))  # on the CPU: the same init everywhere
        bound = 1.0 / math.sqrt(d)
        w = torch.rand(d, m, generator=gen).mul_(2 * bound).sub_(bound)  # U(-1/sqrt d, 1/sqrt d)
        self.W_enc = nn.Parameter(w)  # [d, m]
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(w.t().contiguous())  # [m, d], W_enc^T with unit rows
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.normalize_decoder_()
        if cfg.center_layers:
            self.register_buffer("layer_means", torch.zeros(len(cfg.layers), d))
        for name, value in self.extra_tensors().items():
            self.register_buffer(name, value)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        """Where the weights are (`encode` moves its input there)."""
        return self.W_enc.device

    # ------------------------------------------------------------------ normalization

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise MlsaeError(
                f"SAE expects vectors of width d_in = {self.cfg.d_in} as [N, {self.cfg.d_in}], "
                f"got shape {list(x.shape)}"
            )

    def normalize(
        self, x: Tensor, layer: int | Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Raw x f32[N, d] -> (u [N, d], mean [N, 1], scale [N, 1]): u = (x - mean) / (std +
        1e-5), minus each row's block mean with per-layer centring (`layer`: the block of every
        row, an int or i64[N]); scale is what decode multiplies by (std + 1e-5, or std for
        "layer_norm")."""
        u, mean, scale = self.standardize(x)
        center = self.block_center(layer, len(u))
        return (u if center is None else u - center), mean, scale

    def block_center(self, layer: int | Tensor | None, n: int) -> Tensor | None:
        """mu_l of each of n rows [n, d] on the SAE's device (None without per-layer centring)."""
        if not self.cfg.center_layers:
            return None
        from mlsae.sae.centring import rows_of_blocks

        means = self.get_buffer("layer_means")  # [L, d]
        return means.index_select(0, rows_of_blocks(self.cfg.layers, layer, n).to(means.device))

    def standardize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`normalize` without the per-layer centring: the per-vector standardisation alone."""
        self._check(x)
        x = x.to(self.W_enc.device, torch.float32)
        if self.cfg.normalize == "none":
            return x, x.new_zeros(x.shape[0], 1), x.new_ones(x.shape[0], 1)
        # two passes (mean, then the norm of the deviations): the Bessel-corrected std of
        # torch.std, ~5x faster than torch.std_mean's Welford pass on CPU
        mean = x.mean(dim=1, keepdim=True)  # [N, 1]
        xc = x - mean
        std = torch.linalg.vector_norm(xc, dim=1, keepdim=True) / math.sqrt(max(x.shape[1] - 1, 1))
        u = xc / (std + STD_EPS)
        return u, mean, std if self.cfg.normalize == "layer_norm" else std + STD_EPS

    # ------------------------------------------------------------------ public API

    def encode(self, x: Tensor, layer: int | Tensor | None = None) -> EncoderOutput:
        """Raw x f32[N, d_in] (any device) -> EncoderOutput on the SAE's device (normalization
        inside). `layer`: the block of every row (int or i64[N]), needed by per-layer centring."""
        u, mean, std = self.standardize(x)
        center = self.block_center(layer, len(u))
        if center is not None:
            u = u - center
        if torch.is_grad_enabled() or len(u) <= ENCODE_CHUNK:
            acts, idx = self.encode_normalized(u)
            return EncoderOutput(acts, idx, mean, std, center)
        # no autograd: chunks bound the memory of the dense [rows, d_sae] pre-activations
        parts = [
            self.encode_normalized(u[i : i + ENCODE_CHUNK]) for i in range(0, len(u), ENCODE_CHUNK)
        ]
        acts, idx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return EncoderOutput(acts, idx, mean, std, center)

    @property
    def code_width(self) -> int:
        """w, the columns of every code `encode` returns (k for TopK)."""
        return self.cfg.k

    def encode_normalized(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """The architecture's inference code of normalized rows u [N, d_in]: (acts f32[N, w] >= 0,
        idx i64[N, w]) with w = `code_width`, each row's from that row alone."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_normalized")

    def decode_normalized(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """u_hat = z @ W_dec + b_dec in the normalized space: [N, d_in]."""
        return sparse_decode(top_acts, top_indices, self.W_dec) + self.b_dec

    def decode(self, enc: EncoderOutput) -> Tensor:
        """Reconstruction in the raw space: f32[N, d_in] on the SAE's device (the code may be
        on any device)."""
        enc = enc.to(self.W_dec.device)
        u_hat = self.decode_normalized(enc.top_acts, enc.top_indices)
        if enc.center is not None:
            u_hat = u_hat + enc.center
        elif self.cfg.center_layers:
            raise MlsaeError(
                "this SAE centres each block (center_layers): decode a code from "
                "its own encode(x, layer), which carries the blocks' means"
            )
        return u_hat * enc.std + enc.mean

    def forward(self, x: Tensor, layer: int | Tensor | None = None) -> tuple[Tensor, EncoderOutput]:
        """(x_hat [N, d_in] raw space, EncoderOutput); `layer` as in `encode`."""
        enc = self.encode(x, layer)
        return self.decode(enc), enc

    def dense_acts(self, enc: EncoderOutput) -> Tensor:
        """Dense latent activations f32[N, d_sae] (scatter of top_acts)."""
        out = enc.top_acts.new_zeros(enc.top_acts.shape[0], self.cfg.d_sae)
        return out.scatter_(1, enc.top_indices, enc.top_acts)

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def init_b_dec(self, x: Tensor, layer: int | Tensor | None = None) -> None:
        """b_dec = geometric median of the batch in the normalized space the encoder sees."""
        self.b_dec.copy_(geometric_median(self.normalize(x, layer)[0]))

    @torch.no_grad()
    def init_b_dec_from(self, u: Tensor) -> None:
        """b_dec = geometric median of already normalized vectors u [N, d_in] (distributed
        training: the gathered first global batch)."""
        self.b_dec.copy_(geometric_median(u))

    def train_step_forward(
        self,
        x: Tensor,
        dead: Tensor | None = None,
        k_aux: int = 0,
        aux_coef: float = 0.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        layer: int | Tensor | None = None,
    ) -> StepOutput:
        """The training loss of a raw batch x [N, d_in], with its auxiliary terms. dead: i64 ids
        of dead latents (or None) for AuxK with k_aux latents weighted aux_coef. reduce:
        data-parallel training (see `mlsae.sae.metrics.fvu`): x is this process's share of the
        batch, and the returned losses are its shares of the global batch's. layer: each row's
        block (per-layer centring; the loss is then the FVU of the centred u)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement train_step_forward")

    def reconstruction_loss(
        self,
        u: Tensor,
        enc: Encoded,
        dead: Tensor | None,
        k_aux: int,
        aux_coef: float,
        reduce: Callable[[Tensor], Tensor] | None,
    ) -> StepOutput:
        """Batch FVU of u plus aux_coef * AuxK for the code `enc` of u (SPEC 2).

        AuxK = FVU(e, e_hat) with e = u - u_hat (detached: it is the target) and e_hat = the
        ReLU'd top min(k_aux, #dead) dead pre-activations decoded without b_dec: from
        enc.dead_pre [N, n_dead] (a dense product over the dead columns), or enc.dead_idx's
        sparse entries (each row's k_aux largest; the same math). dead None: no AuxK."""
        if dead is not None and enc.dead_idx.shape[1]:  # e_hat [N, d] has no b_dec
            dec = sparse_decode(enc.acts, enc.idx, self.W_dec)
            e_hat = sparse_decode(enc.dead_pre.relu(), enc.dead_idx, self.W_dec)
        else:
            a = None
            if dead is not None:
                dpre = enc.dead_pre  # [N, n_dead]
                if k_aux < dpre.shape[1]:
                    v, i = dpre.topk(k_aux, dim=1, sorted=False)
                    a = torch.zeros_like(dpre).scatter(1, i, v.relu())
                else:
                    a = dpre.relu()
            # one node decodes both (one W_dec gradient)
            dec, e_hat = sparse_decode_aux(enc.acts, enc.idx, self.W_dec, a, dead)
        u_hat = dec + self.b_dec  # [N, d]
        rec = fvu(u, u_hat, reduce)
        auxk = rec.new_zeros(()) if dead is None else fvu((u - u_hat).detach(), e_hat, reduce)
        return StepOutput(rec + aux_coef * auxk, rec, auxk, enc.acts, enc.idx)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along the (unit) row."""
        g = self.W_dec.grad
        if g is not None:
            g.addcmul_(torch.linalg.vecdot(g, self.W_dec).unsqueeze(1), self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm."""
        norm = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)
        self.W_dec.div_(norm.clamp_min(torch.finfo(norm.dtype).tiny))

    # ------------------------------------------------------------------ files

    def extra_tensors(self) -> dict[str, Tensor]:
        """The architecture's own buffers (name -> initial value), saved with the weights."""
        return {}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor of sae.safetensors: the four weights, then the buffers."""
        d, m = self.cfg.d_in, self.cfg.d_sae
        base = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
        if self.cfg.center_layers:
            base["layer_means"] = (len(self.cfg.layers), d)
        return {**base, **{n: tuple(t.shape) for n, t in self.extra_tensors().items()}}

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors of sae.safetensors (contiguous fp32 copies)."""
        return {
            n: getattr(self, n).detach().to("cpu", torch.float32).contiguous().clone()
            for n in self.tensor_shapes()
        }

    def block_state_tensors(self, layer: int) -> dict[str, Tensor]:
        """`state_tensors` of the SAE as it acts on block `layer` alone: per-layer centring
        folded into the decoder bias (b_dec + mu_l, exact, as the encoder subtracts b_dec) and
        no `layer_means`; for formats with one SAE per hook (SAELens)."""
        t = self.state_tensors()
        means = t.pop("layer_means", None)
        if means is not None:
            from mlsae.sae.centring import rows_of_blocks

            t["b_dec"] = t["b_dec"] + means[int(rows_of_blocks(self.cfg.layers, layer, 1)[0])]
        return t

    def save(self, path: str | Path) -> None:
        """Write the SAE folder (cfg.json + sae.safetensors) atomically: temp dir, then rename."""
        with atomic_dir(path) as tmp:
            write_safetensors(tmp / SAE_WEIGHTS, self.state_tensors())
            write_json(tmp / SAE_CFG, self.cfg.to_dict())
