"""Two evaluation columns next to the headline ones (issue 24 item 5), and the bootstrap of all:

- `fvu_std`: the FVU in the SAE's own standardised space, u = (x - mean_d(x)) / scale per
  vector (x the SAE's input: the model's vector, or T_l(x) for a lens SAE) against u_hat =
  (x_hat - mean_d(x)) / scale, the space training minimises in; `fvu` is in the model's space
  (lens SAEs: lens space, their model space is `fvu_model`). Per-layer centring does not
  change it (a block's own mean is in both terms of its FVU).
- `delta_ce_typical`: delta CE with the norm-outlier positions left clean: the positions whose
  vector's norm is above `factor` x its block's median (the cache's outlier rule,
  mlsae.activations.norms) keep the model's own vector; every other position gets the
  reconstruction, as for `delta_ce`. Only blocks with an outlier in a batch are spliced a
  second time (elsewhere the two are the same splice).

Both have point values (LayerMetrics, like every other column) and, with the bootstrap on,
per-context sums (ContextSums) resampled with the same count matrix as the others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mlsae.core.bootstrap import Bootstrap
from mlsae.core.stage_config import BootstrapConfig
from mlsae.eval.contexts import ContextSums, metric_intervals
from mlsae.eval.result import EvalIntervals, EvalResult, MetricIntervals
from mlsae.sae.metrics import LayerMetrics, mean_or_none

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mlsae.eval.splice import CleanPass


class ExtraSums:
    """The sums behind fvu_std and delta_ce_typical of one evaluated SAE."""

    def __init__(
        self,
        layers: Sequence[int],
        d_in: int,
        d_sae: int,
        bootstrap: bool,
        thresholds: dict[int, float] | None,
    ) -> None:
        self.thresholds = thresholds
        self.std = LayerMetrics(layers, d_in, d_sae)
        self.std_contexts = ContextSums(layers, d_in) if bootstrap else None
        self.splice = LayerMetrics(layers, d_in, d_sae) if thresholds else None
        self.splice_contexts = ContextSums(layers, d_in) if bootstrap and thresholds else None
        self.spliced = False  # whether any delta CE was measured

    def record(self, layer: int, enc: Any, x: Tensor, x_hat: Tensor, contexts: Tensor | None):
        """Add one block's SAE inputs x and reconstructions x_hat [N, d] (the SAE's space) with
        the code `enc` (its mean and scale define the standardised space)."""
        dev = x_hat.device
        mean, scale = enc.mean.to(dev), enc.std.to(dev)
        u, u_hat = (x.to(dev) - mean) / scale, (x_hat - mean) / scale
        self.std.update(layer, u, u_hat, enc.top_indices, enc.top_acts)
        if self.std_contexts is not None and contexts is not None:
            self.std_contexts.update(layer, contexts, u, u_hat)

    def splice_typical(
        self,
        model: PreTrainedModel,
        cp: CleanPass,
        recons: dict[int, Tensor],
        plain: dict[int, Any],
        rows: Tensor,
    ) -> None:
        """delta CE with each block's outlier positions left clean. recons: block -> model-space
        reconstruction of the used positions; plain: splice_layers' stats of `recons` (reused
        where a batch has no outlier); rows [B]: the context of each batch row."""
        from mlsae.eval.batched import splice_layers

        if self.splice is None or self.thresholds is None:
            return
        kept: dict[int, Tensor] = {}
        for layer, x_hat in recons.items():
            x = cp.vectors(layer).to(x_hat.device)
            outlier = x.norm(dim=-1) > self.thresholds[layer]  # [N_used]
            if bool(outlier.any()):
                kept[layer] = torch.where(outlier[:, None], x.to(x_hat.dtype), x_hat)
        stats = {**plain, **(splice_layers(model, cp, kept) if kept else {})}
        for layer, s in stats.items():
            self.splice.update_splice(layer, s.ce_sum, s.kl_sum, s.n)
            self.spliced = True
            if self.splice_contexts is not None and s.rows is not None:
                r = s.rows
                self.splice_contexts.update_splice(layer, rows, r[:, 0], r[:, 1], r[:, 2])

    def fill(self, res: EvalResult) -> None:
        """Put the point values into the result's columns and mean row."""
        res.per_layer.fvu_std = self.std.per_layer()["fvu"]
        res.mean.fvu_std = mean_or_none(res.per_layer.fvu_std)
        if self.splice is not None and self.spliced:
            res.per_layer.delta_ce_typical = self.splice.per_layer()["delta_ce"]
            res.mean.delta_ce_typical = mean_or_none(res.per_layer.delta_ce_typical)


def entry_intervals(e: Any, boot: BootstrapConfig) -> EvalIntervals:
    """FVU, fvu_typical, fvu_std, delta CE, delta_ce_typical and KL intervals of an evaluated
    entry (eval.evaluate.Entry), from one set of context resamples (the same count matrix for
    every metric)."""
    assert e.contexts is not None
    order = dict(e.contexts.row)
    extra = e.extras
    others = [e.typical_contexts]
    if extra is not None:
        others += [extra.std_contexts, extra.splice_contexts]
    for sums in others:
        for c in sums.row if sums is not None else {}:
            order.setdefault(c, len(order))
    bs = Bootstrap(len(order), boot.bootstrap, boot.bootstrap_seed)
    main = e.contexts.aligned(order)
    mi = lambda v: MetricIntervals(*metric_intervals(v, bs))  # noqa: E731
    out = EvalIntervals(bs.info, fvu=mi(main.fvu(bs)))
    if e.typical_contexts is not None:
        out.fvu_typical = mi(e.typical_contexts.aligned(order).fvu(bs))
    if float(main.n_pred.sum()) > 0:
        out.delta_ce, out.kl = mi(main.per_position(bs, "ce")), mi(main.per_position(bs, "kl"))
    if extra is not None and extra.std_contexts is not None:
        out.fvu_std = mi(extra.std_contexts.aligned(order).fvu(bs))
    sc = extra.splice_contexts if extra is not None else None
    if sc is not None and float(sc.n_pred.sum()) > 0:
        out.delta_ce_typical = mi(sc.aligned(order).per_position(bs, "ce"))
    return out
