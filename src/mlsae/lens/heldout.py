"""Held-out early stopping for the tuned lens's KL training (`lens train`'s default).

The held-out contexts are the LAST contexts of the training split's tokens that `lens train`
loaded (neither the regression nor the KL steps see them; `lens evaluate` reads the test split,
which is disjoint by document). Every `eval_every` steps the mean KL(final || lens) over their
used positions is measured per trained block; each block keeps the translator of its best
evaluation (blocks are independent: the loss is a sum over blocks), and training stops once no
block has improved for `patience` evaluations in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mlsae.data.capture import capture, get_final_norm, unembed, used_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK = 256  # positions per unembedding chunk (a [256, vocab] float32 block)
MIN_REL_GAIN = 1e-4  # an evaluation improves a block if its KL drops by more than this fraction


def final_logits(model: PreTrainedModel, x_last: Tensor) -> Tensor:
    """The model's next-token logits from the last block's output. [..., d] -> [..., V] fp32."""
    return unembed(model, get_final_norm(model)(x_last)).float()


def capture_lens_layers(model: PreTrainedModel, lens, ids: Tensor, special_ids: Sequence[int]):
    """One pass: block outputs xs [B, T, Lc, d] of lens.layers + the last block, the used mask
    [B, T] and the captured layer list (sorted)."""
    layers = sorted(set(lens.layers) | {lens.last_layer})
    xs = capture(model, ids, layers)  # [B, T, Lc, d]
    mask = used_mask(ids, special_ids)  # [B, T]
    return xs, mask, layers


@torch.no_grad()
def mean_kl(
    model: PreTrainedModel,
    translate: dict[int, Callable[[Tensor], Tensor]],
    x: Tensor,
    layers: Sequence[int],
) -> dict[int, float]:
    """Per block l of `translate`: mean over the N positions of KL(final || lens_l), where the
    lens logits are unembed(final_norm(translate[l](x_l))). x: [N, Lc, d] captured `layers`
    (the last column is the last block, whose logits are the model's)."""
    norm = get_final_norm(model)
    dtype = next(norm.parameters(), x).dtype
    sums = dict.fromkeys(translate, 0.0)
    for s in range(0, len(x), CHUNK):
        xc = x[s : s + CHUNK]  # [n, Lc, d]
        logp = torch.log_softmax(final_logits(model, xc[:, -1]), dim=-1)  # [n, V]
        p = logp.exp()
        for layer, t in translate.items():
            z = unembed(model, norm(t(xc[:, layers.index(layer)]).to(dtype))).float()
            sums[layer] += float((p * (logp - torch.log_softmax(z, dim=-1))).sum())
    return {layer: v / max(1, len(x)) for layer, v in sums.items()}


@dataclass
class LensTrainLog:
    """What the KL training did: per-step train KL, held-out curve, per-block best, why it
    stopped."""

    history: list[float] = field(default_factory=list)
    """Mean train-batch KL per trained block, one entry per optimizer step."""
    heldout_steps: list[int] = field(default_factory=list)
    """Steps after which the held-out KL was measured (0 = the warm start)."""
    heldout_kl: list[float] = field(default_factory=list)
    """Mean held-out KL over trained blocks at those steps (current translators)."""
    best_step: dict[int, int] = field(default_factory=dict)
    """Per block, the step whose translator was kept."""
    best_kl: dict[int, float] = field(default_factory=dict)
    """Per block, its held-out KL there."""
    stop_reason: str = ""
    heldout_positions: int = 0
    floor_projections: int = 0
    """(step, block) projections that raised a singular value of I + A to the floor (0
    without a floor kept through the steps)."""

    def to_json(self) -> dict:
        blocks = sorted(self.best_step)
        return {
            "steps_run": len(self.history),
            "stop_reason": self.stop_reason,
            "heldout_positions": self.heldout_positions,
            "floor_projections": self.floor_projections,
            "heldout_curve": [
                [s, round(k, 6)] for s, k in zip(self.heldout_steps, self.heldout_kl, strict=True)
            ],
            "best_step_per_layer": {str(b): self.best_step[b] for b in blocks},
            "best_heldout_kl_per_layer": {str(b): round(self.best_kl[b], 6) for b in blocks},
            "heldout_kl_warm_start": round(self.heldout_kl[0], 6) if self.heldout_kl else None,
            "heldout_kl_best": (
                round(sum(self.best_kl.values()) / len(blocks), 6) if blocks else None
            ),
        }


class HeldOut:
    """Held-out positions x [N, Lc, d] and, per block, the best translator seen so far."""

    def __init__(
        self,
        model: PreTrainedModel,
        lens,
        contexts: Tensor,
        special_ids: Sequence[int],
        patience: int,
    ) -> None:
        xs, mask, self.layers = capture_lens_layers(model, lens, contexts, special_ids)
        self.x = xs[mask]  # [N, Lc, d]
        self.patience = int(patience)
        self.best: dict[int, tuple[float, int, Tensor, Tensor]] = {}  # kl, step, A, c
        self.stale = 0  # evaluations in a row without any block improving

    @torch.no_grad()
    def evaluate(self, model: PreTrainedModel, step: int, pre: dict, log: LensTrainLog) -> bool:
        """Measure the current translators `pre` (block -> module with .affine()); keep each
        block's best; return True when training should stop (patience exhausted)."""
        kls = mean_kl(model, pre, self.x, self.layers)
        improved = False
        for layer, kl in kls.items():
            old = self.best.get(layer)
            if old is None or kl < old[0] * (1 - MIN_REL_GAIN):
                a, c = pre[layer].affine()
                self.best[layer] = (kl, step, a.detach().clone(), c.detach().clone())
                improved = True
        self.stale = 0 if improved else self.stale + 1
        log.heldout_steps.append(step)
        log.heldout_kl.append(sum(kls.values()) / len(kls))
        log.best_step = {b: v[1] for b, v in self.best.items()}
        log.best_kl = {b: v[0] for b, v in self.best.items()}
        log.heldout_positions = len(self.x)
        return self.stale >= self.patience
