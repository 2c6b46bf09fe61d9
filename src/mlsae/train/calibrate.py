"""The inference threshold of the threshold architectures (BatchTopK, per-token TopK over
layers), calibrated from the weights being saved: at every checkpoint and at the end of training
(rank 0, which writes them), on the run's fixed sample of training vectors
(`mlsae.train.outputs.training_sample`, the vectors the final FVU pass reads), so that the saved
SAE keeps k latents per vector on average over that sample (`mlsae.sae.batchtopk`). Training
itself never reads the threshold, so a resumed run calibrates to the same value."""

from __future__ import annotations

import logging

from mlsae.activations.source import ActivationSource
from mlsae.core.config import RunConfig
from mlsae.sae.batchtopk import ThresholdSAE
from mlsae.train.member import Member
from mlsae.train.outputs import training_sample

log = logging.getLogger(__name__)


def calibrate_thresholds(run: RunConfig, members: list[Member], source: ActivationSource) -> None:
    """Calibrate the threshold of every threshold SAE among `members` (no-op without one)."""
    cals = [(m, m.sae.calibration()) for m in members if isinstance(m.sae, ThresholdSAE)]
    if not cals:
        return
    for batch in training_sample(run, source, members):
        for m, cal in cals:
            if m.layer is None:
                cal.add(batch.x, batch.layer)
            else:  # a per-layer set: each SAE its own block's vectors
                sel = batch.layer == m.layer
                cal.add(batch.x[sel], batch.layer[sel])
    for m, cal in cals:
        t = cal.finish()
        log.info(
            f"{m.name}: inference threshold {t:.4g} (k = {m.sae.cfg.k} latents per vector on "
            f"average over {cal.rows:,} training vectors)"
        )
