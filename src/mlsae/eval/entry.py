"""One SAE under evaluation (`Entry`): the layers it is evaluated on, its space, its streaming
metrics in both spaces, the per-context sums for the intervals, and the reconstruction of a
batch of one block's vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from mlsae.core.stage_config import BootstrapConfig
from mlsae.eval.contexts import ContextSums
from mlsae.eval.extras import ExtraSums, entry_intervals
from mlsae.eval.result import METRICS, EvalResult, MeanRow, PerLayer
from mlsae.lens.tuned import Space
from mlsae.sae.autoencoder import EncoderOutput, SparseAutoencoder
from mlsae.sae.metrics import LayerMetrics, mean_or_none

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One SAE to evaluate on some layers, with its streaming metrics."""

    label: str
    path: Path
    sae: SparseAutoencoder
    layers: list[int]
    space: Space = field(default_factory=Space)
    metrics: LayerMetrics = field(init=False)  # in the SAE's space
    model_metrics: LayerMetrics | None = None  # in the model's space (lens SAEs only)
    lens_override: Path | None = None  # --lens: where the SAE's lens is now
    # layer -> norm threshold of the stored vectors (factor x median): `typical` leaves out the
    # tokens above it (norm outliers such as attention sinks); None: not measured
    thresholds: dict[int, float] | None = None
    typical: LayerMetrics | None = None
    bootstrap: bool = False
    """Keep per-context sums (ContextSums) for the bootstrap intervals."""
    contexts: ContextSums | None = None
    typical_contexts: ContextSums | None = None
    done: dict[int, tuple[Tensor, EncoderOutput]] = field(default_factory=dict)  # token_pass
    extras: ExtraSums | None = None  # fvu_std, delta_ce_typical (eval/extras.py)

    def __post_init__(self) -> None:
        self.reset_metrics()

    def reset_metrics(self) -> None:
        d_in, d_sae = self.sae.cfg.d_in, self.sae.cfg.d_sae
        self.metrics = LayerMetrics(self.layers, d_in, d_sae)
        lensed = self.space.lens is not None
        self.model_metrics = LayerMetrics(self.layers, d_in, d_sae) if lensed else None
        self.typical = LayerMetrics(self.layers, d_in, d_sae) if self.thresholds else None
        self.contexts = ContextSums(self.layers, d_in) if self.bootstrap else None
        typ = self.bootstrap and self.thresholds
        self.typical_contexts = ContextSums(self.layers, d_in) if typ else None
        self.extras = ExtraSums(self.layers, d_in, d_sae, self.bootstrap, self.thresholds)

    def reconstruct(
        self,
        x: Tensor,
        layer: int,
        record: bool,
        x_model: Tensor | None = None,
        stored_norm: Tensor | None = None,
        contexts: Tensor | None = None,
    ) -> Tensor:
        """x: [N, d] SAE inputs of block `layer` -> the reconstruction [N, d] in the MODEL's space
        (through the exact lens inverse for a lens SAE), optionally recording metrics in both
        spaces. x_model: the model-space vectors (default: the inverse of x). stored_norm [N]:
        the norms of the stored vectors, for the metrics without norm outliers. contexts [N]:
        the context of each vector (for the bootstrap)."""
        x_hat, enc = self.done.pop(layer) if layer in self.done else self.sae(x, layer)
        if record:
            self.metrics.update(layer, x, x_hat, enc.top_indices, enc.top_acts)
            if self.extras is not None:
                self.extras.record(layer, enc, x, x_hat, contexts)
            if self.contexts is not None and contexts is not None:
                self.contexts.update(layer, contexts, x, x_hat)
            if self.typical is not None and self.thresholds and stored_norm is not None:
                keep = (stored_norm <= self.thresholds[layer]).to(x_hat.device)
                self.typical.update(layer, x.to(x_hat.device)[keep], x_hat[keep])
                if self.typical_contexts is not None and contexts is not None:
                    kept = contexts[keep.to(contexts.device)]
                    self.typical_contexts.update(layer, kept, x.to(x_hat.device)[keep], x_hat[keep])
        if self.space.lens is None:
            return x_hat
        x_hat_model = self.space.to_model(x_hat, layer)
        if record and self.model_metrics is not None:
            x_model = self.space.to_model(x, layer) if x_model is None else x_model
            self.model_metrics.update(layer, x_model, x_hat_model)
        return x_hat_model

    def result(self, model: str | None, boot: BootstrapConfig | None = None) -> EvalResult:
        """The metrics, plus for a lens SAE fvu_model / mse_model (model space) and lens_cond:
        cond(I + A_l) per layer, the exact inverse's worst-case error gain; the bootstrap
        intervals when per-context sums were kept."""
        per = self.metrics.per_layer()
        cols = PerLayer(**{k: per[k] for k in METRICS})
        mean = MeanRow(**{k: mean_or_none(per[k]) for k in METRICS})
        res = EvalResult(
            self.layers,
            cols,
            mean,
            self.metrics.dead_fraction(),
            self.metrics.n_tokens,
            sae=str(self.path),
            model=model,
            space="model" if self.space.lens is None else "tuned-lens",
        )
        if self.model_metrics is not None and self.space.lens is not None:
            mr = self.model_metrics.per_layer()
            cols.fvu_model, cols.mse_model = mr["fvu"], mr["mse"]
            mean.fvu_model, mean.mse_model = mean_or_none(mr["fvu"]), mean_or_none(mr["mse"])
            lens = self.space.lens
            cols.lens_cond = [lens.cond(layer) for layer in self.layers]
            res.lens = self.sae.cfg.lens if self.lens_override is None else str(self.lens_override)
        if self.typical is not None:  # the FVU without the tokens whose vector is a norm outlier
            cols.fvu_typical = self.typical.per_layer()["fvu"]
            mean.fvu_typical = mean_or_none(cols.fvu_typical)
        if self.extras is not None:
            self.extras.fill(res)
        boot = boot or BootstrapConfig()
        if self.contexts is not None and self.contexts.n_contexts and boot.bootstrap > 0:
            res.intervals = entry_intervals(self, boot)
        return res
