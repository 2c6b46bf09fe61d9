"""Delta CE and KL by splicing a reconstruction into the residual stream (SPEC section 3).

Generic over architectures, no per-model wrapper:

1. `clean_pass` runs the model once. Forward hooks keep the output of every needed block;
   forward pre-hooks (with_kwargs) keep the arguments each later block received (attention
   mask, rotary position embeddings, cache_position, ...). The forward stops after the last
   block; the clean next-token distributions p come from its output through the model's own
   final norm and unembedding (incl. soft-capping), at predicted positions only.
2. `splice` for layer l replaces block l's output at used positions by the reconstruction and
   calls blocks l+1..L-1 directly with their captured arguments, then final norm + unembedding.
   The block index is the layer itself, for any layer subset.

Predicted positions: position t counts when the token at t is used (not special, not padding)
and its target t+1 exists and is not padding (a special target such as EOS still counts).
Delta CE = mean over those of CE(target | spliced) - CE(target | clean); KL(clean || spliced)
= sum_v p log p - sum_v p log q likewise, with p and sum_v p log p computed once per batch.

Where calling blocks directly does not reproduce the model (checked once per model on the
first batch), `mode="hook"` is used instead: full forward passes with a hook replacing block
l's output (correct, slower).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsae.core.errors import MlsaeError
from mlsae.core.layers import check_layers
from mlsae.data.capture import (
    block_output,
    get_blocks,
    get_final_norm,
    model_device,
    n_layers_of,
    unembed,
    used_mask,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

Mode = Literal["auto", "direct", "hook"]
_CHUNK = 2048  # predicted positions per unembedding chunk (bounds [chunk, vocab] temporaries)
_SUB = 16  # rows per log-softmax + loss step: [16, vocab] stays in cache (~1.7x faster)
_MODE_CACHE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class _Stop(Exception):
    pass


@dataclass
class CleanPass:
    """Everything a spliced continuation needs, for one batch of contexts."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor | None  # [B, T]
    used: Tensor  # [B, T] bool, positions whose vectors are reconstructed
    pred: Tensor  # [B, T] bool, positions whose next-token prediction counts
    targets: Tensor  # [P] next-token ids at predicted positions
    hidden: dict[int, Tensor]  # layer -> block output [B, T, d] (model dtype)
    block_inputs: dict[int, tuple[tuple, dict[str, Any]]]  # block -> (args after h, kwargs)
    clean_p: Tensor  # [P, V] float32 clean next-token probabilities
    clean_negent: Tensor  # [P] sum_v p log p (clean)
    clean_ce: Tensor  # [P] clean CE of the target
    mode: str  # "direct" or "hook"

    @property
    def n_pred(self) -> int:
        return int(self.targets.numel())

    def vectors(self, layer: int) -> Tensor:
        """Block-`layer` outputs at used positions: [N_used, d] float32 (row-major order)."""
        return self.hidden[layer][self.used].float()


@dataclass
class SpliceStats:
    """Sums over the predicted positions of one batch."""

    ce_sum: float  # sum of CE(spliced) - CE(clean)
    kl_sum: float  # sum of KL(clean || spliced)
    n: int
    rows: Tensor | None = field(default=None, compare=False)
    """[B, 3] float64 per context row: ce_sum, kl_sum, n (the bootstrap's per-context sums;
    not part of ==, which compares the batch sums)."""


def predicted_mask(used: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """[B, T] bool: predictions made from used positions whose target exists (not padding)."""
    pred = used.clone()
    pred[:, -1] = False
    if attention_mask is not None:
        pred[:, :-1] &= attention_mask[:, 1:].bool()
    return pred


def _logp_chunks(model: PreTrainedModel, last: Tensor, pred: Tensor) -> Iterator[Tensor]:
    """Final norm + unembedding of the last block's output [B, T, d] at predicted positions:
    [c, V] float32 log-probability chunks in predicted-position order."""
    h = get_final_norm(model)(last[pred])  # [P, d]; the norm acts per position
    for c in h.split(_CHUNK):
        for sub in unembed(model, c).float().split(_SUB):  # row-wise: same numbers
            yield F.log_softmax(sub, dim=-1)


def _model_logp_chunks(logits: Tensor, pred: Tensor) -> Iterator[Tensor]:
    """The model's own logits [B, T, V] at predicted positions, as [c, V] log-prob chunks."""
    for c in logits[pred].split(_CHUNK):
        for sub in c.float().split(_SUB):
            yield F.log_softmax(sub, dim=-1)


def _clean_stats(chunks: Iterator[Tensor], targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p [P, V], sum_v p log p [P], CE of the targets [P]) from log-prob chunks."""
    ps, negent, ce, start = [], [], [], 0
    for logp in chunks:
        t = targets[start : start + len(logp), None]
        p = logp.exp()
        ps.append(p)
        negent.append(torch.einsum("pv,pv->p", p, logp))  # einsum: no [c, V] temporary
        ce.append(-logp.gather(1, t).squeeze(1))
        start += len(logp)
    if not ps:
        z = torch.zeros(0)
        return z[:, None], z, z
    return torch.cat(ps), torch.cat(negent), torch.cat(ce)


def _make(mode, input_ids, attention_mask, used, pred, targets, hidden, inputs, chunks):
    p, negent, ce = _clean_stats(chunks, targets)
    return CleanPass(
        input_ids, attention_mask, used, pred, targets, hidden, inputs, p, negent, ce, mode
    )


@torch.no_grad()
def clean_pass(
    model: PreTrainedModel,
    input_ids: Tensor,
    layers: Sequence[int],
    special_ids: Sequence[int] = (),
    attention_mask: Tensor | None = None,
    mode: Mode = "auto",
    used: Tensor | None = None,
) -> CleanPass:
    """One forward pass keeping the outputs of `layers` and what splicing needs.

    input_ids: [B, T]. `used` ([B, T] bool) overrides the mask derived from `special_ids`.
    mode: "direct" (continue from block l+1), "hook" (full passes), "auto" (direct, checked
    once per model against the model's own logits; falls back to hook on any mismatch).
    """
    layers = check_layers(layers, n_layers_of(model))
    dev = model_device(model)  # everything of the pass lives on the model's device
    input_ids = input_ids.to(dev)
    attention_mask = attention_mask.to(dev) if attention_mask is not None else None
    used = used.to(dev) if used is not None else None
    if used is None:
        used = used_mask(input_ids, special_ids, attention_mask)
    pred = predicted_mask(used, attention_mask)
    targets = input_ids[:, 1:][pred[:, :-1]]
    if mode == "auto":
        mode = cast(Mode, _MODE_CACHE.get(model, "auto"))
    if mode == "hook":
        return _clean_hook(model, input_ids, layers, attention_mask, used, pred, targets)
    try:
        cp = _clean_direct(model, input_ids, layers, attention_mask, used, pred, targets)
    except Exception as e:  # some architecture whose blocks cannot be captured/called
        if mode == "direct":
            raise
        _fallback(model, f"{type(e).__name__}: {e}")
        return _clean_hook(model, input_ids, layers, attention_mask, used, pred, targets)
    if mode == "auto":
        reason = _self_check(model, cp)
        if reason is not None:
            _fallback(model, reason)
            return _clean_hook(model, input_ids, layers, attention_mask, used, pred, targets)
        _MODE_CACHE[model] = "direct"
    return cp


def _fallback(model: PreTrainedModel, reason: str) -> None:
    _MODE_CACHE[model] = "hook"
    log.warning(
        f"splicing {type(model).__name__}: calling blocks directly does not reproduce "
        f"the model ({reason}); using full forward passes with a hook (slower)"
    )


def _self_check(model: PreTrainedModel, cp: CleanPass) -> str | None:
    """None if the direct path reproduces the model's own next-token distributions (final
    norm + unembedding, and a continuation from the first kept block), else the reason."""
    if cp.n_pred == 0:
        return None
    out = model(input_ids=cp.input_ids, attention_mask=cp.attention_mask, use_cache=False)
    ref = torch.cat(list(_model_logp_chunks(out.logits, cp.pred))).exp()
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 1e-2
    err = float((ref - cp.clean_p).abs().max())
    if not err <= tol:
        return f"final norm/unembedding: probabilities differ by {err:.2e}"
    first = min(cp.hidden)
    try:
        last = _continue(model, cp, first, cp.hidden[first])
        cont = torch.cat(list(_logp_chunks(model, last, cp.pred))).exp()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    err = float((cont - cp.clean_p).abs().max())
    return None if err <= tol else f"continuation: probabilities differ by {err:.2e}"


def _clean_direct(model, input_ids, layers, attention_mask, used, pred, targets) -> CleanPass:
    blocks = get_blocks(model)
    n = len(blocks)
    keep = set(layers) | {n - 1}
    hidden: dict[int, Tensor] = {}
    inputs: dict[int, tuple[tuple, dict[str, Any]]] = {}

    def out_hook(i: int):
        def hook(_m, _inp, out):
            hidden[i] = block_output(out)
            if i == n - 1:
                raise _Stop  # the final norm and unembedding are ours, at predicted positions

        return hook

    def pre_hook(i: int):
        def hook(_m, args, kwargs):
            inputs[i] = (tuple(args[1:]), dict(kwargs))

        return hook

    handles = [blocks[i].register_forward_hook(out_hook(i)) for i in sorted(keep)]
    handles += [
        blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        for i in range(min(layers) + 1, n)
    ]
    try:
        with suppress(_Stop):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in sorted(keep) if i not in hidden]
    if missing:
        raise MlsaeError(f"blocks {missing} did not run during the forward pass")
    hid = {i: hidden[i] for i in layers}
    chunks = _logp_chunks(model, hidden[n - 1], pred)
    return _make("direct", input_ids, attention_mask, used, pred, targets, hid, inputs, chunks)


def _clean_hook(model, input_ids, layers, attention_mask, used, pred, targets) -> CleanPass:
    blocks = get_blocks(model)
    hidden: dict[int, Tensor] = {}

    def out_hook(i: int):
        def hook(_m, _inp, out):
            hidden[i] = block_output(out)

        return hook

    handles = [blocks[i].register_forward_hook(out_hook(i)) for i in layers]
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    chunks = _model_logp_chunks(out.logits, pred)
    return _make("hook", input_ids, attention_mask, used, pred, targets, hidden, {}, chunks)


def _replaced(cp: CleanPass, layer: int, x_hat: Tensor) -> Tensor:
    """Block-`layer` output with used positions replaced: [B, T, d]."""
    h = cp.hidden[layer]
    n_used = int(cp.used.sum())
    if x_hat.ndim != 2 or x_hat.shape != (n_used, h.shape[-1]):
        raise MlsaeError(
            f"reconstruction of layer {layer} has shape {tuple(x_hat.shape)}, "
            f"expected [{n_used}, {h.shape[-1]}] (used positions x d_model)"
        )
    h = h.clone()
    h[cp.used] = x_hat.to(h.device, h.dtype)
    return h


def _continue(model: PreTrainedModel, cp: CleanPass, layer: int, h: Tensor) -> Tensor:
    """Run blocks layer+1..L-1 on h [B, T, d] with the captured arguments -> [B, T, d]."""
    blocks = get_blocks(model)
    for i in range(layer + 1, len(blocks)):
        args, kwargs = cp.block_inputs[i]
        h = block_output(blocks[i](h, *args, **kwargs))
    return h


def _hook_forward(model: PreTrainedModel, cp: CleanPass, layer: int, h: Tensor) -> Tensor:
    """Full forward pass with block `layer`'s output replaced by h -> logits [B, T, V]."""

    def hook(_m, _inp, out):
        if isinstance(out, (tuple, list)):
            return type(out)((h, *out[1:]))
        return h

    handle = get_blocks(model)[layer].register_forward_hook(hook)
    try:
        out = model(input_ids=cp.input_ids, attention_mask=cp.attention_mask, use_cache=False)
    finally:
        handle.remove()
    return out.logits


def _spliced_chunks(model: PreTrainedModel, cp: CleanPass, layer: int, x_hat: Tensor):
    """Spliced [c, V] log-probability chunks in predicted-position order."""
    if layer not in cp.hidden:
        raise MlsaeError(f"layer {layer} was not kept by the clean pass ({sorted(cp.hidden)})")
    h = _replaced(cp, layer, x_hat)
    if cp.mode == "hook":
        yield from _model_logp_chunks(_hook_forward(model, cp, layer, h), cp.pred)
    else:
        yield from _logp_chunks(model, _continue(model, cp, layer, h), cp.pred)


@torch.no_grad()
def spliced_logp(model: PreTrainedModel, cp: CleanPass, layer: int, x_hat: Tensor) -> Tensor:
    """[P, V] log-probabilities with block `layer`'s output replaced at used positions by
    x_hat ([N_used, d], raw model space, rows in `cp.used` row-major order)."""
    return torch.cat(list(_spliced_chunks(model, cp, layer, x_hat)))


@torch.no_grad()
def splice(model: PreTrainedModel, cp: CleanPass, layer: int, x_hat: Tensor) -> SpliceStats:
    """Delta CE and KL sums of one layer's reconstruction over the batch's predicted positions.

    Per position: CE = -log q(target), KL(p || q) = sum_v p log p - sum_v p log q, with the
    clean p and sum_v p log p computed once (no [P, V] temporaries; the exact original
    reproduces the clean numbers bit for bit). Memory: [chunk, vocab] at a time."""
    if cp.n_pred == 0:
        return SpliceStats(0.0, 0.0, 0)
    return _stats(cp, _spliced_chunks(model, cp, layer, x_hat))


def _stats(cp: CleanPass, chunks: Iterator[Tensor]) -> SpliceStats:
    """Delta CE and KL sums from the spliced [c, V] log-probability chunks."""
    ce = kl = 0.0
    start = 0
    row = cp.pred.nonzero()[:, 0].cpu()  # [P] context row of each predicted position
    rows = torch.zeros(cp.pred.shape[0], 3, dtype=torch.float64)
    for logq in chunks:
        sl = slice(start, start + len(logq))
        ce_q = -logq.gather(1, cp.targets[sl, None]).squeeze(1)
        kl_c = cp.clean_negent[sl] - torch.einsum("pv,pv->p", cp.clean_p[sl], logq)
        ce_d = (ce_q - cp.clean_ce[sl]).to("cpu", torch.float64)  # no f64 on MPS
        kl_d = kl_c.to("cpu", torch.float64)
        ce += float(ce_d.sum())
        kl += float(kl_d.sum())
        vals = torch.stack([ce_d, kl_d, torch.ones_like(ce_d)], dim=1)
        rows.index_add_(0, row[sl], vals)
        start = sl.stop
    return SpliceStats(ce, kl, cp.n_pred, rows)


class BatchObserver(Protocol):
    """Something an evaluation feeds every clean pass to, after the one-block splices
    (`evaluate --replace`, SAEBench's zero ablations: eval/several.py)."""

    key: str  # its section of the evaluation JSON

    def update(self, model: PreTrainedModel, cp: CleanPass) -> None: ...

    def to_json(self) -> dict[str, Any]: ...
