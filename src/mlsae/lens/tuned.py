"""The tuned lens (Belrose et al. 2023; SPEC section 5): one affine translator per block output.

Index convention (ours): translators are keyed by BLOCK index l in 0..L-1, the same index as
`capture.capture` and the activation cache use. T_l acts on x[t,l], the output of block l
(before the final norm for the last block). T_l(h) = h + A_l h + c_l with A_l [d, d] and
c_l [d] initialised at zero; the last block's output (l = L-1) always uses the identity and has
no parameters. The lens logits at block l are unembed(final_norm(T_l(h))), and the exact
inverse is h = (I + A_l)^{-1} (z - c_l), a float64 LU solve (never the diagonal of the
inverse; SPEC "known faults").

The tuned-lens package (AlignmentResearch/tuned-lens) indexes its translators by
`hidden_states` index instead: it has `num_hidden_layers` translators (`nn.Linear` with bias,
h + W h + b, i.e. A = W, c = b), translator i acting on hidden_states[i]. hidden_states[0] is
the embedding output, so its translator 0 has no counterpart here and is dropped; its
translator i >= 1 acts on the output of block i - 1 and becomes our T_{i-1}; the last block
output hidden_states[L] has no translator there either (identity). See `load_tuned_lens_package`.

Folder format (`TunedLens.save`): `lens.safetensors` with `A.<l>` [d, d] and `c.<l>` [d] for
every block l with a translator, and `lens.json` (format, model, n_layers, d_model, layers,
training settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object, write_json, write_safetensors
from mlsae.data.capture import get_final_norm, unembed
from mlsae.lens.package import read_tuned_lens_package

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LENS_FORMAT = "mlsae-tuned-lens"
LENS_WEIGHTS, LENS_JSON = "lens.safetensors", "lens.json"
DEFAULT_MAX_COND = 1e6
"""Largest accepted condition number of I + A_l: beyond it the inverse would amplify
reconstruction errors (and rounding) by more than a million."""


class TunedLens(nn.Module):
    """Affine translators T_l(h) = h + A_l h + c_l for block outputs l (identity at l = L-1)."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        layers: Sequence[int] | None = None,
        model: str = "",
        meta: dict[str, Any] | None = None,
        max_cond: float = DEFAULT_MAX_COND,
    ) -> None:
        super().__init__()
        layers = list(range(n_layers)) if layers is None else sorted(set(int(x) for x in layers))
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad or not layers:
            raise MlsaeError(f"lens layer(s) {bad or '[]'} out of range 0..{n_layers - 1}")
        self.n_layers, self.d_model, self.layers = int(n_layers), int(d_model), layers
        self.model_name, self.meta, self.max_cond = model, dict(meta or {}), float(max_cond)
        self.translators = nn.ModuleDict()
        for layer in self.trained_layers:
            lin = nn.Linear(d_model, d_model, bias=True)  # weight = A_l, bias = c_l
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.translators[str(layer)] = lin
        self._lu: dict[int, tuple[tuple[int, int], Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        """Where the translators are (the CPU unless moved)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def last_layer(self) -> int:
        return self.n_layers - 1

    @property
    def trained_layers(self) -> list[int]:
        """Blocks that have parameters (every covered block but the last)."""
        return [x for x in self.layers if x != self.last_layer]

    def covers(self, layer: int) -> bool:
        return layer == self.last_layer or layer in self.layers

    def check_layers(self, layers: Sequence[int]) -> None:
        """MlsaeError if some block has no translator in this lens."""
        missing = [x for x in layers if not self.covers(int(x))]
        if missing:
            raise MlsaeError(
                f"the lens has no translator for layer(s) {missing} (has {self.layers})"
            )

    def check_model(self, n_layers: int, d_model: int) -> None:
        """MlsaeError if the lens was made for a model of another shape."""
        if (n_layers, d_model) != (self.n_layers, self.d_model):
            raise MlsaeError(
                f"lens is for a model with {self.n_layers} blocks and width {self.d_model}, "
                f"not {n_layers} blocks and width {d_model}"
            )

    def _linear(self, layer: int) -> nn.Linear | None:
        """The translator of block `layer`, None for the (identity) last block."""
        if layer == self.last_layer:
            return None
        if str(layer) not in self.translators:
            raise MlsaeError(f"the lens has no translator for layer {layer} (has {self.layers})")
        return cast(nn.Linear, self.translators[str(layer)])

    def A(self, layer: int) -> Tensor:
        """A_l [d, d] (zeros for the last block)."""
        lin = self._linear(layer)
        return torch.zeros(self.d_model, self.d_model) if lin is None else lin.weight

    def c(self, layer: int) -> Tensor:
        """c_l [d] (zeros for the last block)."""
        lin = self._linear(layer)
        return torch.zeros(self.d_model) if lin is None else lin.bias

    def cond(self, layer: int) -> float:
        """2-norm condition number of I + A_l in float64 (the worst-case factor by which the
        exact inverse amplifies relative errors); 1 for the identity (last) block."""
        m = torch.eye(self.d_model, dtype=torch.float64) + self.A(layer).detach().double()
        return float(torch.linalg.cond(m))

    # ------------------------------------------------------------------ maps
    def forward(self, h: Tensor, layer: int) -> Tensor:
        """T_l(h) = h + A_l h + c_l. h: [..., d] -> [..., d] in h's dtype (computed in fp32)."""
        lin = self._linear(int(layer))
        if lin is None:
            return h
        hf = h.to(lin.weight.dtype)
        return (hf + nn.functional.linear(hf, lin.weight, lin.bias)).to(h.dtype)

    def inverse(self, z: Tensor, layer: int) -> Tensor:
        """Exact h = (I + A_l)^{-1} (z - c_l) by a float64 LU solve. z: [..., d] -> [..., d] in
        z's dtype (differentiable in z, not in the lens parameters)."""
        lin = self._linear(int(layer))
        if lin is None:
            return z
        lu, piv = self._factor(int(layer), lin)
        rhs = (z.reshape(-1, self.d_model).to(torch.float64) - lin.bias.detach().double()).T
        h = torch.linalg.lu_solve(lu, piv, rhs).T  # [N, d]
        return h.reshape(z.shape).to(z.dtype)

    def _factor(self, layer: int, lin: nn.Linear) -> tuple[Tensor, Tensor]:
        """LU of I + A_l in float64, cached until the weight changes; checks the condition."""
        key = (lin.weight.data_ptr(), lin.weight._version)
        hit = self._lu.get(layer)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable anywhere
            m = torch.eye(self.d_model, dtype=torch.float64) + lin.weight.detach().double()
            cond = float(torch.linalg.cond(m))
            lu, piv, _ = torch.linalg.lu_factor_ex(m)
        if not cond < self.max_cond:  # also catches inf/nan
            raise MlsaeError(
                f"lens translator of layer {layer} is ill-conditioned (cond(I + A) = {cond:.3g} "
                f">= {self.max_cond:.0e}): its inverse is not reliable"
            )
        self._lu[layer] = (key, lu, piv)
        return lu, piv

    def forward_stack(self, x: Tensor, layers: Sequence[int]) -> Tensor:
        """T applied per layer: x [..., L, d] with x[..., i, :] from block layers[i]."""
        return torch.stack([self(x[..., i, :], lay) for i, lay in enumerate(layers)], dim=-2)

    def inverse_stack(self, z: Tensor, layers: Sequence[int]) -> Tensor:
        """Exact inverse per layer: z [..., L, d] with z[..., i, :] in lens space of layers[i]."""
        return torch.stack([self.inverse(z[..., i, :], lay) for i, lay in enumerate(layers)], -2)

    @torch.no_grad()
    def forward_rows(self, x: Tensor, layer_of_row: Tensor) -> Tensor:
        """T applied row by row (no autograd): x [N, d], layer_of_row [N] block of each row."""
        out = x.clone()
        for lay in torch.unique(layer_of_row).tolist():
            sel = layer_of_row == lay
            out[sel] = self(x[sel], int(lay))
        return out

    def logits(self, model: PreTrainedModel, h: Tensor, layer: int) -> Tensor:
        """Lens logits unembed(final_norm(T_l(h))). h: [..., d] -> [..., vocab]."""
        norm = get_final_norm(model)
        dtype = next(norm.parameters(), h).dtype
        return unembed(model, norm(self(h, layer).to(dtype)))

    # ------------------------------------------------------------------ files
    def config(self) -> dict[str, Any]:
        return {
            "format": LENS_FORMAT,
            "model": self.model_name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "layers": self.layers,
            "identity_layer": self.last_layer,
            "max_cond": self.max_cond,
            **self.meta,
        }

    def save(self, path: str | Path) -> None:
        """Write `lens.safetensors` + `lens.json` into the folder `path` (atomically each)."""
        path = Path(path)
        tensors: dict[str, Tensor] = {}
        for layer in self.trained_layers:
            lin = self._linear(layer)
            assert lin is not None
            tensors[f"A.{layer}"] = lin.weight.detach().float().contiguous()
            tensors[f"c.{layer}"] = lin.bias.detach().float().contiguous()
        write_safetensors(path / LENS_WEIGHTS, tensors, metadata={"format": LENS_FORMAT})
        write_json(path / LENS_JSON, self.config())

    def _set(self, layer: int, a: Tensor, c: Tensor | None) -> None:
        lin = self._linear(layer)
        assert lin is not None, "the last block has no translator"
        if tuple(a.shape) != (self.d_model, self.d_model) or (
            c is not None and tuple(c.shape) != (self.d_model,)
        ):
            raise MlsaeError(
                f"lens translator of layer {layer} has the wrong shape {tuple(a.shape)}"
            )
        for t in (a, c) if c is not None else (a,):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise MlsaeError(
                    f"lens translator of layer {layer} holds NaN, inf or non-float values"
                )
        with torch.no_grad():
            lin.weight.copy_(a.float())
            lin.bias.copy_(c.float() if c is not None else torch.zeros(self.d_model))


def identity_lens(n_layers: int, d_model: int, model: str = "") -> TunedLens:
    """The logit lens: every translator is the identity (A = 0, c = 0)."""
    return TunedLens(n_layers, d_model, model=model, meta={"kind": "logit"})


def load_lens(path: str | Path) -> TunedLens:
    """Load a lens folder: ours (`lens.json` + `lens.safetensors`) or the tuned-lens
    package's (`config.json` + `params.pt`)."""
    path = Path(path)
    if not path.is_dir():
        raise MlsaeError(f"lens folder {str(path)!r} does not exist")
    if (path / LENS_JSON).is_file():
        return _load_ours(path)
    if (path / "params.pt").is_file() and (path / "config.json").is_file():
        return load_tuned_lens_package(path)
    raise MlsaeError(
        f"{path} is not a lens folder (expected {LENS_JSON} + {LENS_WEIGHTS}, "
        "or tuned-lens config.json + params.pt)"
    )


def load_tuned_lens_package(path: str | Path) -> TunedLens:
    """A lens saved by the tuned-lens package, re-indexed onto block outputs: its translator i
    (acting on hidden_states[i]) becomes our T_{i-1}; its translator 0 (embeddings) is dropped;
    the last block is the identity (module docstring)."""
    found = read_tuned_lens_package(path)
    lens = TunedLens(
        found.n_layers,
        found.d_model,
        model=str(found.config.get("base_model_name_or_path", "")),
        meta={"source": "tuned-lens", "tuned_lens_config": found.config},
    )
    for i in range(1, found.n_layers):  # hidden_states[i] = output of block i - 1
        lens._set(i - 1, found.weights[i]["weight"], found.weights[i].get("bias"))
    return lens.eval()


def _load_ours(path: Path) -> TunedLens:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mlsae.core.schema import from_dict

    cfg = read_json_object(path / LENS_JSON, "lens config")
    info = from_dict(LensInfo, cfg, str(path / LENS_JSON))
    meta = {k: v for k, v in cfg.items() if k not in _CORE_KEYS}
    lens = TunedLens(
        info.n_layers,
        info.d_model,
        info.layers,
        model=info.model or "",
        meta=meta,
        max_cond=info.max_cond,
    )
    try:
        tensors = load_file(str(path / LENS_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise MlsaeError(f"cannot read {path / LENS_WEIGHTS}: {e}") from None
    for layer in lens.trained_layers:
        if f"A.{layer}" not in tensors or f"c.{layer}" not in tensors:
            raise MlsaeError(f"{path / LENS_WEIGHTS}: no translator for layer {layer}")
        lens._set(layer, tensors[f"A.{layer}"], tensors[f"c.{layer}"])
    return lens.eval()


@dataclass
class LensInfo:
    """lens.json's fields that loading relies on (the rest is kept as `meta`)."""

    format: str
    """Always mlsae-tuned-lens."""
    n_layers: int
    d_model: int
    layers: list[int]
    """Blocks the lens covers."""
    model: str | None = ""
    max_cond: float = DEFAULT_MAX_COND

    def __post_init__(self) -> None:
        if self.format != LENS_FORMAT:
            raise MlsaeError(f"format is {self.format!r}, not {LENS_FORMAT!r}")
        if self.n_layers < 1 or self.d_model < 1 or self.max_cond <= 0:
            raise MlsaeError("n_layers and d_model must be >= 1, max_cond > 0")


_CORE_KEYS = {"format", "model", "n_layers", "d_model", "layers", "identity_layer", "max_cond"}


# ----------------------------------------------------------------------------- spaces


def lens_ref(path: str | Path) -> str:
    """How caches and SAEs record a lens: its folder's absolute path."""
    return str(Path(path).resolve())


class Space:
    """Where an SAE's inputs live. `lens` None: the model's residual space. Otherwise the SAE
    sees T_l(x) and reconstructions return through the exact inverse; `cache_in_lens` says the
    cache being read already holds T_l(x) (a `cache --lens` cache) rather than x."""

    def __init__(self, lens: TunedLens | None = None, cache_in_lens: bool = False) -> None:
        self.lens, self.cache_in_lens = lens, bool(cache_in_lens and lens is not None)

    @torch.no_grad()
    def to_sae(self, x: Tensor, layer: int) -> Tensor:
        """Model-space vectors [N, d] of block `layer` -> SAE inputs (no autograd), on x's
        device (the lens itself stays on the CPU)."""
        if self.lens is None:
            return x
        return self.lens.forward(x.to(self.lens.device), layer).to(x.device)

    @torch.no_grad()
    def to_model(self, z: Tensor, layer: int) -> Tensor:
        """SAE-space vectors (inputs or reconstructions) -> model space (exact inverse), on
        z's device."""
        if self.lens is None:
            return z
        return self.lens.inverse(z.to(self.lens.device), layer).to(z.device)

    def cached_to_sae(self, x: Tensor, layer: int) -> Tensor:
        """Vectors read from the cache -> SAE inputs."""
        return x if self.cache_in_lens else self.to_sae(x, layer)

    def cached_to_model(self, x: Tensor, layer: int) -> Tensor:
        """Vectors read from the cache -> model space."""
        return self.to_model(x, layer) if self.cache_in_lens else x


def resolve_space(
    sae_lens: str | None,
    cache_lens: str | None,
    *,
    override: str | Path | None = None,
    sae_dir: Path | None = None,
    what: str = "the SAE",
) -> Space:
    """The Space of an SAE trained with `sae_lens` (its cfg.lens; `override` replaces it, e.g. a
    moved lens folder) reading a cache built with `cache_lens` (its manifest's lens, or None for
    the model). MlsaeError when the two cannot be reconciled."""
    path: Path | None = None
    if override is not None and not sae_lens:
        raise MlsaeError(f"--lens: {what} was trained in the model's space, not with a tuned lens")
    if override is not None:
        path = Path(override)
    elif sae_lens:
        path = Path(sae_lens)
        if not path.exists() and sae_dir is not None and (sae_dir / path).exists():
            path = sae_dir / path  # a path relative to the SAE folder
    if path is None:
        if cache_lens:
            raise MlsaeError(
                f"the cache holds tuned-lens vectors (lens {cache_lens}) but {what} was trained "
                "in the model's space: use a cache built without --lens"
            )
        return Space()
    lens = load_lens(path)
    if cache_lens and lens_ref(cache_lens) != lens_ref(path):
        raise MlsaeError(
            f"the cache was built with lens {cache_lens} but {what} uses lens {lens_ref(path)}: "
            "use a cache built without --lens (the lens is then applied on the fly)"
        )
    return Space(lens, cache_in_lens=bool(cache_lens))
