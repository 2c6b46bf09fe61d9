"""Several blocks replaced in one forward (SPEC 7, `mlsae evaluate --replace`).

For a set S = s_0 < s_1 < ... of blocks, the model runs once with every block of a prefix
{s_0..s_m} replaced by its SAE's reconstruction *as the forward reaches it*: block s_1's SAE
reads block s_1's output computed from the already spliced s_0, and so on. Only used positions
are replaced (special tokens and, where the source excludes them, attention-sink positions keep
their own vectors, as in the one-block splice). Delta CE and KL are those of SPEC 3, over the
same predicted positions as the one-block splices.

One pass gives every cumulative prefix: the "main" chain replaces every block of S; just before
it replaces s_{m+1}, its state is the prefix {s_0..s_m} at block s_{m+1}, which is kept and
continued unreplaced to the end (the continuations batched as in batched.py). In "hook" mode
(models whose blocks cannot be called directly) each prefix is one full forward with hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.data.capture import block_output, get_blocks
from mlsae.eval.batched import _BATCHABLE, BATCH_TOKENS, continue_states
from mlsae.eval.splice import CleanPass, SpliceStats, _logp_chunks, _model_logp_chunks, _stats

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Recon = Callable[[int, Tensor], Tensor]
"""(block, x [N_used, d] float32 model-space vectors) -> reconstruction [N_used, d]."""


def parse_replace(spec: str, layers: Sequence[int]) -> list[int]:
    """--replace: 'all' (every evaluated layer), '0-k' or a list '0,3,5' -> sorted blocks, each
    one of `layers` (those the SAE(s) are evaluated on)."""
    from mlsae.core.layers import iter_layers_arg

    have = sorted(set(int(x) for x in layers))
    text = spec.strip().lower()
    if text == "all":
        return have
    try:
        chosen = sorted(set(iter_layers_arg(text, 1 << 20)))
    except (MlsaeError, ValueError) as e:
        raise MlsaeError(
            f"--replace {spec!r}: give 'all', a range '0-5' or a list '0,3' ({e})"
        ) from None
    missing = [x for x in chosen if x not in have]
    if not chosen or missing:
        raise MlsaeError(
            f"--replace {spec!r}: block(s) {missing or chosen} are not among the "
            f"evaluated layers {have}"
        )
    return chosen


def _with(h: Tensor, used: Tensor, x_hat: Tensor) -> Tensor:
    """h [B, T, d] with its used positions replaced by x_hat [N_used, d]."""
    if x_hat.shape != (int(used.sum()), h.shape[-1]):
        raise MlsaeError(
            f"reconstruction of shape {tuple(x_hat.shape)}, expected "
            f"[{int(used.sum())}, {h.shape[-1]}] (used positions x d_model)"
        )
    h = h.clone()
    h[used] = x_hat.to(h.device, h.dtype)
    return h


def _recon_at(h: Tensor, used: Tensor, block: int, recon: Recon) -> Tensor:
    """h with used positions replaced by the reconstruction of its own vectors there."""
    return _with(h, used, recon(block, h[used].float()))


@torch.no_grad()
def replace_prefixes(
    model: PreTrainedModel, cp: CleanPass, blocks: Sequence[int], recon: Recon
) -> list[SpliceStats]:
    """stats[m]: delta CE / KL sums with blocks[0..m] all replaced in one forward."""
    chosen = sorted(set(int(b) for b in blocks))
    if not chosen:
        raise MlsaeError("replace_prefixes needs at least one block")
    if chosen[0] not in cp.hidden:
        raise MlsaeError(f"block {chosen[0]} was not kept by the clean pass ({sorted(cp.hidden)})")
    if cp.n_pred == 0:
        return [SpliceStats(0.0, 0.0, 0) for _ in chosen]
    if cp.mode == "hook":
        return [_hooked(model, cp, chosen[: m + 1], recon) for m in range(len(chosen))]
    layers = get_blocks(model)
    first, later = chosen[0], set(chosen[1:])
    branches: dict[int, Tensor] = {}  # block s_{m+1} -> prefix {s_0..s_m}'s output there
    h = _recon_at(cp.hidden[first], cp.used, first, recon)
    for j in range(first + 1, len(layers)):
        args, kwargs = cp.block_inputs[j]
        h = block_output(layers[j](h, *args, **kwargs))
        if j in later:
            branches[j] = h
            h = _recon_at(h, cp.used, j, recon)
    out = [SpliceStats(0.0, 0.0, 0) for _ in chosen]
    out[-1] = _stats(cp, _logp_chunks(model, h, cp.pred))
    starts = sorted(branches)
    b, t = cp.input_ids.shape
    per_call = max(1, BATCH_TOKENS // max(1, b * t)) if _BATCHABLE.get(model, True) else 1
    for i in range(0, len(starts), per_call):
        group = starts[i : i + per_call]
        for start, last in continue_states(model, cp, group, branches.__getitem__):
            out[chosen.index(start) - 1] = _stats(cp, _logp_chunks(model, last, cp.pred))
    return out


def _hooked(model: PreTrainedModel, cp: CleanPass, prefix: list[int], recon: Recon) -> SpliceStats:
    """One full forward with hooks replacing every block of `prefix` as it is reached."""

    def hook_for(block: int):
        def hook(_m, _inp, out):
            h = _recon_at(block_output(out), cp.used, block, recon)
            return type(out)((h, *out[1:])) if isinstance(out, (tuple, list)) else h

        return hook

    layers = get_blocks(model)
    handles = [layers[j].register_forward_hook(hook_for(j)) for j in prefix]
    try:
        out = model(input_ids=cp.input_ids, attention_mask=cp.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return _stats(cp, _model_logp_chunks(out.logits, cp.pred))


# ----------------------------------------------------------------------------- accumulation


@dataclass
class ReplaceRow:
    """Delta CE and KL with `blocks` replaced together (means over predicted positions)."""

    blocks: list[int]
    delta_ce: float | None
    kl: float | None
    n_pred: int


@dataclass
class ReplaceResult:
    """`evaluate --replace`: the cumulative prefixes of the chosen blocks; the last row is the
    whole set."""

    spec: str
    rows: list[ReplaceRow]


@dataclass
class Replacement:
    """Streams `replace_prefixes` over the batches of an evaluation (a run_model observer)."""

    spec: str
    blocks: list[int]
    recon: Recon
    ce_sum: list[float] = field(init=False)
    kl_sum: list[float] = field(init=False)
    n: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ce_sum = [0.0] * len(self.blocks)
        self.kl_sum = [0.0] * len(self.blocks)
        self.n = [0] * len(self.blocks)

    def update(self, model: PreTrainedModel, cp: CleanPass) -> None:
        for m, s in enumerate(replace_prefixes(model, cp, self.blocks, self.recon)):
            self.ce_sum[m] += s.ce_sum
            self.kl_sum[m] += s.kl_sum
            self.n[m] += s.n

    def result(self) -> ReplaceResult:
        rows = [
            ReplaceRow(
                self.blocks[: m + 1],
                self.ce_sum[m] / n if n else None,
                self.kl_sum[m] / n if n else None,
                n,
            )
            for m, n in enumerate(self.n)
        ]
        return ReplaceResult(self.spec, rows)
