"""The causal check of the cross-layer measures (issue 24 item 3c): does removing an up
feature from block l's output switch off the down feature the measures call its predecessor?

For an adjacent pair (l, l+1) of a per-layer set, on `causal_contexts` held-out contexts:
1. the model runs once up to block l+1; block l's output h [B, T, d] and the arguments block
   l+1 received (attention mask, rotary embeddings, ...) are kept; calling block l+1 directly
   on h must reproduce its output (checked, else an error);
2. the down SAE encodes block l+1's output: base activations b_j(t) (at used positions);
3. for a tested down feature j and a predecessor i, i's contribution to block l's output,
   a_i(t) * W_dec[i] with a_i(t) in model space (the SAE's activation times the vector's
   scale: the decode's exact term, undoing per-vector standardisation), is subtracted at every
   used position; block l+1 runs on the edited h, the down SAE re-encodes, and the event (t, j)
   counts as killed when b_j(t) > 0 and the new activation is <= (1 - drop) * b_j(t).
Predecessors of j, chosen on the whole held-out cache (as `mlsae evolution` measures them):
  pearson      the up feature of highest Pearson with j (its best previous-layer partner);
  decoder_cos  the up feature whose decoder row is most aligned with j's;
  random       an up feature drawn (seeded) among those active on >= 1 token where j is.
Per kind: the mean over tested features of the fraction of j's active tokens killed, with a
bootstrap interval over the tested features, and the pooled fraction over all (t, j) events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mlsae.core.bootstrap import Bootstrap, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import ControlsConfig, EvolutionConfig
from mlsae.data.capture import block_output, get_blocks
from mlsae.evolution.codes import comparable_acts
from mlsae.sae.autoencoder import SparseAutoencoder

log = logging.getLogger(__name__)

KINDS = ("pearson", "decoder_cos", "random")


class _Stop(Exception):
    """Ends the forward pass after the block that is needed."""


class NextBlock:
    """Block l+1 of a model, callable on an edited block-l output with the arguments it
    received in a real forward pass over `ids` (no padding: every context is full)."""

    def __init__(self, model: nn.Module, ids: Tensor, layer: int) -> None:
        blocks = get_blocks(model)
        if not 0 <= layer < len(blocks) - 1:
            raise MlsaeError(
                f"the causal check needs blocks {layer} and {layer + 1}: the model "
                f"has {len(blocks)}"
            )
        self.block = blocks[layer + 1]
        kept: dict[str, Any] = {}

        def keep_out(_m, _inp, out):
            kept["h"] = block_output(out).detach()

        def keep_in(_m, args, kwargs):
            kept["args"], kept["kwargs"] = args[1:], dict(kwargs)

        def stop(_m, _inp, out):
            kept["next"] = block_output(out).detach()
            raise _Stop

        handles = [
            blocks[layer].register_forward_hook(keep_out),
            self.block.register_forward_pre_hook(keep_in, with_kwargs=True),
            self.block.register_forward_hook(stop),
        ]
        try:
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        self.h: Tensor = kept["h"]  # [B, T, d] block l's output
        self.args, self.kwargs = kept["args"], kept["kwargs"]
        again = self(self.h)
        scale = float(kept["next"].abs().max().clamp_min(1e-30))
        self.mismatch = float((again - kept["next"]).abs().max()) / scale
        if self.mismatch > 1e-4:
            raise MlsaeError(
                f"calling block {layer + 1} directly does not reproduce the model "
                f"(relative difference {self.mismatch:.2e}): the causal check "
                "cannot run on this architecture"
            )

    @torch.inference_mode()
    def __call__(self, h: Tensor) -> Tensor:
        """Block l+1's output [B, T, d] from block l's output h [B, T, d]."""
        return block_output(self.block(h, *self.args, **self.kwargs))


def feature_acts(enc_acts: Tensor, enc_idx: Tensor, features: Tensor) -> Tensor:
    """[n, F] activations of the given features from TopK codes [n, k] (0 off the code)."""
    hit = enc_idx[:, :, None] == features[None, None, :]  # [n, k, F]
    return (enc_acts[:, :, None] * hit).sum(1)


def choose_predecessors(
    best_prev_idx: Tensor,
    cross: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    alive_up: Tensor,
    features: Tensor,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    """The three predecessors [F] (int64) of each tested down feature (see the module doc).
    cross [d_up, d_down]: sum_t a_i b_j (> 0 where i and j were both active on a token)."""
    wu = torch.nn.functional.normalize(w_up.double(), dim=1)
    wd = torch.nn.functional.normalize(w_down.double(), dim=1)
    cos = (wd[features] @ wu.T).masked_fill(~alive_up[None, :], -2.0)  # [F, d_up]
    random = torch.empty(len(features), dtype=torch.int64)
    for n, j in enumerate(features.tolist()):
        pool = (cross[:, j] > 0).nonzero(as_tuple=True)[0]
        if len(pool) == 0:
            raise MlsaeError(f"down feature {j} has no co-active up feature")
        random[n] = pool[torch.randint(len(pool), (1,), generator=gen)]
    return {
        "pearson": best_prev_idx[features].clone(),
        "decoder_cos": cos.argmax(1),
        "random": random,
    }


@dataclass
class CausalResult:
    """The causal check of one adjacent pair."""

    up_layer: int
    down_layer: int
    n_tokens: int  # used tokens of the causal contexts
    n_features: int  # tested down features
    rates: dict[str, float]  # kind -> mean over features of the killed fraction
    intervals: dict[str, Interval | None]  # kind -> bootstrap over tested features
    pooled: dict[str, float]  # kind -> killed / active over all (token, feature) events
    same_as_pearson: dict[str, float]  # kind -> fraction of features whose predecessor is
    # the Pearson one
    block_mismatch: float  # relative max difference of the direct call of block l+1
    features: list[dict] = field(default_factory=list)  # per feature: j, predecessors, fractions


@torch.inference_mode()
def killed_fractions(
    nxt: NextBlock,
    used: Tensor,
    sae_up: SparseAutoencoder,
    sae_down: SparseAutoencoder,
    features: Tensor,
    preds: dict[str, Tensor],
    drop: float,
    rescale: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Per kind: killed event counts [F] and active counts [F] of the tested features, and the
    base activations [n_used, F]."""
    h = nxt.h
    enc_up = sae_up.encode(h[used].float())
    contrib = (enc_up.top_acts * enc_up.std).cpu()  # model-space coefficient of each row
    up_idx = enc_up.top_indices.cpu()

    def down_acts(h_edit: Tensor) -> Tensor:
        enc = sae_down.encode(nxt(h_edit)[used].float())
        return feature_acts(comparable_acts(enc, rescale).cpu(), enc.top_indices.cpu(), features)

    base = down_acts(h)
    active = base > 0
    killed = {k: torch.zeros(len(features), dtype=torch.int64) for k in preds}
    w = sae_up.W_dec.detach()
    for i in torch.unique(torch.cat(list(preds.values()))).tolist():
        a_i = (contrib * (up_idx == i)).sum(1)  # [n_used]
        if not bool((a_i != 0).any()):
            continue  # nothing removed: nothing changes
        h_edit = h.clone()
        h_edit[used] -= (a_i[:, None].to(w.device) * w[i]).to(h.dtype)
        after = down_acts(h_edit)
        dead = active & (after <= (1 - drop) * base)  # [n_used, F]
        for kind, p in preds.items():
            cols = p == i
            killed[kind][cols] += dead[:, cols].sum(0)
    n_active = active.sum(0)
    return killed, {k: n_active for k in preds}, base


def causal_pair(
    nxt: NextBlock,
    used: Tensor,
    layers: tuple[int, int],
    saes: tuple[SparseAutoencoder, SparseAutoencoder],
    features: Tensor,
    preds: dict[str, Tensor],
    cfg: EvolutionConfig,
    ctl: ControlsConfig,
) -> CausalResult:
    """Run the removals of one pair and summarise them."""
    killed, active, _ = killed_fractions(
        nxt, used, saes[0], saes[1], features, preds, ctl.drop, cfg.rescale
    )
    bs = Bootstrap(len(features), ctl.resamples, ctl.control_seed)
    rates, intervals, pooled, same = {}, {}, {}, {}
    for kind in preds:
        frac = killed[kind].double() / active[kind].double().clamp_min(1)
        rates[kind] = float(frac.mean())
        intervals[kind] = bs.interval(bs.sums(frac[:, None])[:, 0] / len(features))
        pooled[kind] = float(killed[kind].sum()) / max(int(active[kind].sum()), 1)
        same[kind] = float((preds[kind] == preds["pearson"]).double().mean())
    per_feature = [
        {
            "feature": int(j),
            "active_tokens": int(active["pearson"][n]),
            **{f"{k}_up": int(preds[k][n]) for k in preds},
            **{f"{k}_killed": int(killed[k][n]) for k in preds},
        }
        for n, j in enumerate(features.tolist())
    ]
    return CausalResult(
        layers[0],
        layers[1],
        int(used.sum()),
        len(features),
        rates,
        intervals,
        pooled,
        same,
        nxt.mismatch,
        per_feature,
    )


def format_causal(results: list[CausalResult], drop: float | None = None) -> str:
    """The causal table: per pair, the killed rate of each predecessor kind with its interval;
    then the kill threshold and the interval's method (given `drop`)."""
    head = f"{'pair':>7} {'tokens':>6} {'feats':>5} " + " ".join(
        f"{k + ' [95% CI]':>26}" for k in KINDS
    )
    lines = [head]
    for r in results:
        cells = []
        for k in KINDS:
            iv = r.intervals.get(k)
            ci = "" if iv is None else f" [{iv.low:.3f},{iv.high:.3f}]"
            cells.append(f"{r.rates[k]:.3f}{ci}".rjust(26))
        lines.append(
            f"{r.up_layer:>3}-{r.down_layer:<3} {r.n_tokens:>6} {r.n_features:>5} "
            + " ".join(cells)
        )
    if drop is not None:
        lines.append(
            f"killed: the down feature's activation falls to <= {1 - drop:g} x its value "
            f"(--drop {drop:g}); 95% CI: percentile bootstrap over the tested down features"
        )
    return "\n".join(lines)
