"""Readers of foreign SAE folders into an mlsae config + weights (W_enc [d, m], b_enc [m],
W_dec [m, d], b_dec [d]).

sparsify (EleutherAI/sparsify `SparseCoder.save_to_disk`): `cfg.json` (SparseCoderConfig + d_in)
and `sae.safetensors` with `encoder.weight` [m, d], `encoder.bias` [m], `W_dec` [m, d], `b_dec`
[d]. Forward: z = TopK_k(ReLU((x - b_dec) @ encoder.weight^T + encoder.bias)), x_hat = z @ W_dec
+ b_dec, no input normalization. ReLU before TopK equals our ReLU after TopK wherever a value
is non-zero, so the reconstruction and the dense activations are the same.

The paper's checkpoints (tim-lawson/mlsae, `PyTorchModelHubMixin.save_pretrained`):
- `MLSAE` repos (`tim-lawson/mlsae-<model>-x<R>-k<k>[-lens]`): `config.json` with the init
  arguments n_inputs, n_latents, k, dead_steps_threshold, dead_threshold, auxk, standardize;
  `model.safetensors` with `encoder.weight` [m, d], `decoder.weight` [d, m], `pre_encoder_bias`
  [d] (and maybe a `last_nonzero` buffer). No encoder bias.
- `MLSAETransformer` repos (`...-tfm`, single-layer baselines `sae-...-tfm-layers-<l>`):
  `config.json` with model_name, layers (None = every block), expansion_factor, k, standardize,
  tuned_lens, max_length, ...; the same weights under `autoencoder.`, plus the transformer's.
Forward (model/autoencoder.py): u = (x - mu) / (std + 1e-5) with std Bessel-corrected when
standardize; pre = (u - b_pre) @ W_enc; z = ReLU(TopK_k(pre)); x_hat = (z @ W_dec + b_pre) *
std + mu: mlsae's normalize="layer_norm". Layer l is the output of GPT-NeoX block l (the
embeddings are not a layer), as in mlsae.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object
from mlsae.interchange.meta import layer_of_hook

log = logging.getLogger(__name__)

SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
PAPER_CFG, PAPER_WEIGHTS, PAPER_BIN = "config.json", "model.safetensors", "pytorch_model.bin"
_PAPER_NAME = re.compile(
    r"(?:ml)?sae-(?P<model>.+?)-x(?P<r>\d+)-k(?P<k>\d+)(?P<rest>(?:-[a-z0-9]+)*)$"
)


def _load_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or (weights-only) PyTorch file; MlsaeError naming it for
    anything else (a pickle payload, a truncated file, a non-tensor value)."""
    try:
        if path.suffix == ".bin":
            w = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            w = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError, EOFError, pickle.PickleError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise MlsaeError(f"{path}: unreadable weights ({first})") from None
    if not isinstance(w, dict) or not all(isinstance(v, Tensor) for v in w.values()):
        raise MlsaeError(f"{path}: not a mapping of names to tensors")
    return w


def strict_int(value: Any, what: str) -> int:
    """An integer read from a foreign config: an int, or a float with no fractional part;
    MlsaeError naming `what` for anything else (4.7 is not silently 4, "4" not read as 4)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MlsaeError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise MlsaeError(f"{what} must be an integer, not {value!r}")
    return int(value)


def strict_layers(value: Any, what: str) -> list[int] | None:
    """Block indices read from a foreign config: None, or a list of integers >= 0 (a string
    such as "012" is not read as [0, 1, 2])."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise MlsaeError(f"{what} must be a list of block indices, not {value!r}")
    out = [strict_int(x, what) for x in value]
    if any(x < 0 for x in out):
        raise MlsaeError(f"{what} holds a negative block index: {value!r}")
    return out


def _shape(d: int, m: int, k: int, what: str) -> int:
    if m % d:
        raise MlsaeError(f"{what}: {m} latents is not a multiple of the width {d}")
    if not 1 <= k <= m:
        raise MlsaeError(f"{what}: k = {k} is not between 1 and {m}")
    return m // d


# ----------------------------------------------------------------------------- sparsify


def read_sparsify(
    folder: Path, model: str | None = None, layers: list[int] | None = None
) -> tuple[SaeConfig, dict[str, Tensor]]:
    """A sparsify SparseCoder folder (one hookpoint) as an mlsae config + weights."""
    raw = read_json_object(folder / SPARSIFY_CFG, "sparsify config")
    if raw.get("activation", "topk") != "topk":
        raise MlsaeError(f"{folder}: activation {raw['activation']!r}; only TopK imports")
    for flag in ("transcode", "skip_connection"):
        if raw.get(flag):
            raise MlsaeError(f"{folder}: a sparsify {flag} coder is not an autoencoder of x")
    w = _load_tensors(folder / SPARSIFY_WEIGHTS)
    if "W_skip" in w:
        raise MlsaeError(f"{folder}: a skip connection (W_skip) has no mlsae counterpart")
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(w)
    if missing:
        raise MlsaeError(f"{folder / SPARSIFY_WEIGHTS}: no {sorted(missing)}")
    m, d = w["encoder.weight"].shape
    k = strict_int(raw.get("k", 0), f"{folder / SPARSIFY_CFG}: k")
    r = _shape(int(d), int(m), k, str(folder))
    layer = layer_of_hook(folder.name)
    cfg = SaeConfig(
        d_in=int(d),
        expansion_factor=r,
        k=k,
        normalize="none",
        layers=layers or ([layer] if layer is not None else []),
        model=model or "",
        dataset="",
    )
    t = {
        "W_enc": w["encoder.weight"].float().t().contiguous(),
        "b_enc": w["encoder.bias"].float().contiguous(),
        "W_dec": w["W_dec"].float().contiguous(),
        "b_dec": w["b_dec"].float().contiguous(),
    }
    return cfg, t


# ----------------------------------------------------------------------------- the paper


def parse_paper_name(name: str) -> dict[str, Any]:
    """Fields of a paper repo id or folder name: model (EleutherAI/<model>), R, k, lens, tfm,
    layers ('-layers-4'); {} if the name does not follow the paper's convention."""
    m = _PAPER_NAME.match(name.rsplit("/", 1)[-1])
    if not m:
        return {}
    rest = m.group("rest")
    lay = re.search(r"-layers-(\d+)", rest)
    return {
        "model": f"EleutherAI/{m.group('model')}",
        "expansion_factor": int(m.group("r")),
        "k": int(m.group("k")),
        "lens": "-lens" in rest,
        "layers": [int(lay.group(1))] if lay else None,
    }


def _model_layers(model: str) -> list[int]:
    """Every block of `model`, from its config (local folder, HF cache, then the hub)."""
    from transformers import AutoConfig

    from mlsae.core.hub import hub_reachable

    local = Path(model).is_dir() or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    try:
        try:
            cfg = AutoConfig.from_pretrained(model, local_files_only=True)
        except OSError:
            if local or not hub_reachable():
                raise
            cfg = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise MlsaeError(
            f"cannot tell the layers of {model!r} offline ({str(e).splitlines()[0][:80]}): "
            "pass --layers (e.g. 0-5 for Pythia-70m)"
        ) from None
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        raise MlsaeError(f"cannot tell the layers of {model!r} from its config: pass --layers")
    return list(range(int(n)))


def read_paper(
    folder: Path, name: str | None = None, model: str | None = None, layers: list[int] | None = None
) -> tuple[SaeConfig, dict[str, Tensor]]:
    """A checkpoint of the paper's code (MLSAE or MLSAETransformer) as an mlsae config +
    weights. `name`: its repo id (else the folder name) for the model, R and k it encodes."""
    raw = read_json_object(folder / PAPER_CFG, "checkpoint config")
    wpath = folder / PAPER_WEIGHTS if (folder / PAPER_WEIGHTS).is_file() else folder / PAPER_BIN
    w = _load_tensors(wpath)
    hint = parse_paper_name(name or folder.name)
    tfm = "autoencoder.encoder.weight" in w
    p = "autoencoder." if tfm else ""
    missing = {f"{p}encoder.weight", f"{p}decoder.weight", f"{p}pre_encoder_bias"} - set(w)
    if missing:
        raise MlsaeError(f"{wpath}: not a tim-lawson/mlsae checkpoint (no {sorted(missing)})")
    enc, dec, b_pre = w[f"{p}encoder.weight"], w[f"{p}decoder.weight"], w[f"{p}pre_encoder_bias"]
    m, d = enc.shape
    if tuple(dec.shape) != (d, m) or tuple(b_pre.shape) != (d,):
        raise MlsaeError(
            f"{wpath}: encoder {list(enc.shape)}, decoder {list(dec.shape)} do not fit"
        )
    if raw.get("tuned_lens") or hint.get("lens"):
        raise MlsaeError(
            f"{folder}: trained on tuned-lens outputs with the paper's indexing (translator l "
            "applied to block l's output, one at the last block too): mlsae's lens cannot "
            "represent that; import the plain MLSAE instead"
        )
    k = strict_int(raw.get("k") or hint.get("k") or 0, f"{folder / PAPER_CFG}: k")
    r = _shape(int(d), int(m), k, str(folder))
    if hint and (hint["expansion_factor"], hint["k"]) != (r, k):
        log.warning(
            f"{name or folder.name}: its name says x{hint['expansion_factor']}-k"
            f"{hint['k']} but the weights are x{r}-k{k}"
        )
    model = model or raw.get("model_name") or hint.get("model")
    if not model:
        raise MlsaeError(f"{folder}: the checkpoint does not name its model: pass --model")
    if not isinstance(model, str):
        raise MlsaeError(f"{folder / PAPER_CFG}: model_name must be a string, not {model!r}")
    given = strict_layers(raw.get("layers"), f"{folder / PAPER_CFG}: layers")
    chosen: list[int] = list(layers or given or hint.get("layers") or _model_layers(model))
    standardize = raw.get("standardize", True)
    if not isinstance(standardize, bool):
        raise MlsaeError(f"{folder / PAPER_CFG}: standardize must be true or false")
    cfg = SaeConfig(
        d_in=int(d),
        expansion_factor=r,
        k=k,
        normalize="layer_norm" if standardize else "none",
        layers=[int(x) for x in chosen],
        model=model,
        dataset="monology/pile-uncopyrighted",
    )
    t = {
        "W_enc": enc.float().t().contiguous(),
        "b_enc": torch.zeros(int(m)),
        "W_dec": dec.float().t().contiguous(),
        "b_dec": b_pre.float().contiguous(),
    }
    return cfg, t
