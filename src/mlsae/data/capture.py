"""Residual-stream capture for any Hugging Face causal LM (SPEC section 1).

One generic mechanism: forward hooks on the model's list of transformer blocks. The vector of
layer l is the output of block l; the last block's output is taken before the final norm;
embeddings are not a layer. The forward pass stops after the last block that is needed.
Works for Llama/SmolLM, GPT-NeoX/Pythia, GPT-2 and Gemma-style models alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mlsae.core.errors import MlsaeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm", "norm_f")


def n_layers_of(model: nn.Module) -> int:
    """Number of transformer blocks, from the model config."""
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return len(get_blocks(model))


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the largest ModuleList whose length is the
    configured layer count (model.layers, gpt_neox.layers, transformer.h, ...)."""
    cfg = model.config
    want = next(
        (
            getattr(cfg, n)
            for n in ("num_hidden_layers", "n_layer", "num_layers")
            if hasattr(cfg, n)
        ),
        None,
    )
    best: nn.ModuleList | None = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (want is None or len(mod) == want):
            if best is None or len(mod) > len(best):
                best = mod
            if want is not None:
                break
    if best is None:
        raise MlsaeError(f"cannot find the transformer block list of {type(model).__name__}")
    return best


def get_final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (model.norm, final_layer_norm, ln_f, ...)."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise MlsaeError(f"cannot find the final norm of {type(model).__name__}")


def get_unembed(model: PreTrainedModel) -> nn.Module:
    """The unembedding (lm_head)."""
    head = model.get_output_embeddings()
    if head is None:
        raise MlsaeError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    return head


def unembed(model: PreTrainedModel, h: Tensor) -> Tensor:
    """Logits from a residual vector *after* the final norm, as the model computes them
    (including Gemma-2 style final logit soft-capping)."""
    logits = get_unembed(model)(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def used_mask(
    input_ids: Tensor,
    special_ids: Sequence[int],
    attention_mask: Tensor | None = None,
    exclude_first: bool = False,
) -> Tensor:
    """[B, T] bool: True at positions used for training/metrics/analysis, False at special
    tokens (BOS, EOS, PAD and any the tokenizer marks special), at padding, and at position 0
    of every context with exclude_first (the attention sink, SPEC 1)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if exclude_first and mask.shape[-1]:
        mask[..., 0] = False
    if len(special_ids):
        mask &= ~torch.isin(input_ids, torch.as_tensor(list(special_ids), device=input_ids.device))
    if attention_mask is not None:
        mask &= attention_mask.bool()
    return mask


def special_ids_of(tokenizer) -> list[int]:
    """Every id the tokenizer marks special, plus bos/eos/pad."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    # added tokens flagged special (e.g. SmolLM2's <file_sep>, <jupyter_code>...) are often
    # missing from all_special_ids
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    return sorted(ids)


def block_output(out) -> Tensor:
    """A block's hidden-state output, whether the block returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    pass


@contextmanager
def _hooks(blocks: nn.ModuleList, layers: Sequence[int], store: dict[int, Tensor], stop_at: int):
    """Store the outputs of `layers` in `store`; abort the forward pass after block `stop_at`."""
    keep = set(layers)

    def make(i: int):
        def hook(_mod, _inp, out):
            if i in keep:
                store[i] = block_output(out)
            if i == stop_at:
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_hook(make(i)) for i in sorted(keep | {stop_at})]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Validate a layer list against the model; returns it sorted and de-duplicated."""
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if x < 0 or x >= n_layers]
    if bad or not out:
        raise MlsaeError(
            f"layer(s) {bad or '[]'} out of range: the model has blocks 0..{n_layers - 1}"
        )
    return out


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: Tensor,
    layers: Sequence[int],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Block outputs of the chosen layers.

    input_ids: [B, T] (any device: moved to the model's) -> returns [B, T, n_layers, d_model]
    in the model's dtype on the CPU, layers in the order given by `sorted(layers)`. The forward
    pass stops right after block max(layers). Each block's output is copied into its slot of the result as the block returns (no list
    of kept outputs, no final stack), so the forward reuses its buffers as a bare one does.
    """
    layers = check_layers(layers, n_layers_of(model))
    blocks = get_blocks(model)
    slot = {layer: i for i, layer in enumerate(layers)}
    out: list[Tensor] = []  # the [B, T, L, d] result, allocated at the first kept block
    done: set[int] = set()
    stop_at = max(layers)
    dev = model_device(model)
    mask = attention_mask.to(dev) if attention_mask is not None else None

    def make(i: int):
        def hook(_mod, _inp, o):
            h = block_output(o)  # [B, T, d]
            if not out:
                out.append(h.new_empty(*h.shape[:-1], len(layers), h.shape[-1]))
            out[0][..., slot[i], :].copy_(h)
            done.add(i)
            if i == stop_at:
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_hook(make(i)) for i in layers]
    try:
        with suppress(_StopForward):
            model(input_ids=input_ids.to(dev), attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in layers if i not in done]
    if missing:
        raise MlsaeError(f"blocks {missing} did not run during the forward pass")
    return out[0].cpu()


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's weights."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def truncated_forward(model: nn.Module, input_ids: Tensor, last_layer: int) -> None:
    """A bare forward that stops after block `last_layer` and keeps nothing (for benchmarks)."""
    blocks = get_blocks(model)
    with _hooks(blocks, [], {}, stop_at=last_layer), suppress(_StopForward):
        model(input_ids=input_ids.to(model_device(model)), use_cache=False)


def iter_layers_arg(spec: str | None, n_layers: int) -> list[int]:
    """Parse a CLI layer spec: None/'all' -> every block; '0,3,5' or '0-5' or mixed."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                if int(b) < int(a):
                    raise MlsaeError(f"layers {spec!r}: the range {part} is empty (write {b}-{a})")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise MlsaeError(
            f"cannot parse layers {spec!r}: use e.g. 'all', '0,5,10' or '0-11'"
        ) from None
    if any(x < 0 for x in out):
        raise MlsaeError(f"layers {spec!r}: block indices start at 0 (e.g. '0-5')")
    return check_layers(out, n_layers)
