"""Steering for the prompt page: a latent's decoder direction added to the residual stream at one
or more blocks, at every non-special position (prompt and generated tokens alike).

Units. With `units="max"` the factor is in units of the latent's maximum activation in the index:
at a token t and block l the added vector is factor * max_act * scale[t, l] * d_l, where d_l is
the decoder row in the model's space at l and scale[t, l] is what the SAE's decode multiplies
by there (std + 1e-5 of the token's vector for a standardizing SAE, 1 without normalization).
That is exactly what the latent would add to the reconstruction if it fired at factor x its
maximum. With `units="raw"` the vector is factor * d_l (no scale).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.data.capture import block_output, get_blocks


@dataclass
class SteerPlan:
    """What to add: per block, the unit direction d_l [d] and a function giving the per-token
    scale [T] of a block output h [T, d] (already multiplied by the factor)."""

    directions: dict[int, Tensor]
    scale: Callable[[int, Tensor], Tensor]  # (layer, h [T, d] float32) -> [T]
    special_ids: list[int]


def added(plan: SteerPlan, layer: int, h: Tensor, ids: Tensor) -> Tensor:
    """The vectors added at `layer` to block outputs h [T, d] of tokens ids [T]: [T, d]."""
    keep = ~torch.isin(ids, torch.as_tensor(plan.special_ids, dtype=ids.dtype))
    s = plan.scale(layer, h.float()) * keep.float()  # [T]
    return s[:, None] * plan.directions[layer][None, :]


@contextmanager
def steering(model: torch.nn.Module, plan: SteerPlan | None, ids: Tensor) -> Iterator[None]:
    """Forward hooks adding the plan's vectors at its blocks for a pass over ids [1, T]."""
    handles = []
    if plan is not None:
        blocks = get_blocks(model)

        def hook_of(layer: int):
            def hook(_m, _inp, out):
                h = block_output(out)
                h = h + added(plan, layer, h[0], ids[0]).to(h.dtype)[None]
                return type(out)((h, *out[1:])) if isinstance(out, (tuple, list)) else h

            return hook

        handles = [blocks[ly].register_forward_hook(hook_of(ly)) for ly in plan.directions]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def logp_at(model: torch.nn.Module, ids: list[int], plan: SteerPlan | None) -> Tensor:
    """Log-probabilities [T, V] of the next token at every position of ids, steered by plan."""
    x = torch.tensor([ids])
    with steering(model, plan, x):
        logits = model(input_ids=x, use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1)


def generate(
    model: torch.nn.Module, ids: list[int], plan: SteerPlan | None, n: int, stop: set[int]
) -> list[int]:
    """Greedy continuation of ids by up to n tokens, stopping after a token in `stop`. Uses the
    model's key/value cache: each step runs only the new token, whose vectors the hooks steer
    like every earlier position's."""
    out: list[int] = []
    x, past = torch.tensor([ids]), None
    for _ in range(n):
        with steering(model, plan, x):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
        past = o.past_key_values
        nxt = int(o.logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        x = torch.tensor([[nxt]])
    return out
