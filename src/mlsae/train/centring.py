"""The training side of per-layer centring (mlsae.sae.centring): at the start of a new run, one
pass over a shuffled sample of the training vectors (MEAN_TOKENS tokens of every block, in the
space the SAE sees: after the lens, after per-vector standardisation) estimates each block's
mean and its mean-to-deviation ratio; `--center-layers auto` decides from the ratios, and the
choice is printed and stored in the run's settings (a resume keeps it, and its means come back
with the checkpoint)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource, Batch
from mlsae.core.config import Normalize, RunConfig
from mlsae.core.io import recover_dir
from mlsae.sae.centring import MEAN_TOKENS, BlockMeans, auto_choice, describe_choice
from mlsae.train.checkpoint import CHECKPOINT, STATE

log = logging.getLogger(__name__)


@torch.no_grad()
def estimate_block_means(
    source: ActivationSource,
    layers: list[int],
    to_sae: Callable[[Batch], Tensor],
    normalize: Normalize,
    seed: int,
    tokens: int = MEAN_TOKENS,
) -> BlockMeans:
    """Each block's mean of the standardised SAE inputs over a shuffled sample of `tokens`
    tokens per block (or all the source holds)."""
    from mlsae.core.config import SaeConfig
    from mlsae.sae.autoencoder import SparseAutoencoder

    d = source.d_model
    probe = SparseAutoencoder(SaeConfig(d_in=d, expansion_factor=1, k=1, normalize=normalize))
    acc = BlockMeans(list(layers), d)
    want = tokens * len(layers)
    for batch in source.shuffled(8192, list(layers), seed=seed + 2, drop_last=False):
        acc.update(probe.standardize(to_sae(batch))[0], batch.layer)
        if float(acc.count.sum()) >= want:
            break
    return acc


def resolve_centring(
    out: Path,
    run: RunConfig,
    source: ActivationSource,
    to_sae: Callable[[Batch], Tensor],
    main: bool = True,
) -> tuple[RunConfig, Tensor | None]:
    """The run with `--center-layers` resolved to on / off, and the block means [L, d] (rows in
    run.layers order) a new run starts from (None: no centring, or a resume, whose means are
    in its checkpoint). auto: the MLSAE decides from the ratios; one-block SAEs are off."""
    choice = run.sae.center_layers
    if run.sae.architecture == "crosscoder":  # its decoder bias is per block already
        choice = "off"
    resuming = (recover_dir(Path(out) / CHECKPOINT) / STATE).is_file()
    if resuming or choice == "off" or (choice == "auto" and run.mode != "mlsae"):
        on = choice == "on"  # a run made before the option: "auto" in no file, so off
        if main and not resuming:
            why = "--center-layers off" if choice == "off" else "auto: SAEs of one block"
            log.info(f"per-layer centring {'on' if on else 'off'} ({why})")
        return replace(run, sae=replace(run.sae, center_layers="on" if on else "off")), None
    acc = estimate_block_means(source, list(run.layers), to_sae, run.sae.normalize, run.train.seed)
    ratios = acc.ratios()
    on = choice == "on" or auto_choice(ratios)
    if main:
        log.info(describe_choice(choice, on, list(run.layers), ratios))
        per = " ".join(f"{ly}:{r:.2f}" for ly, r in zip(run.layers, ratios, strict=True))
        log.info(f"block mean / RMS deviation (standardised space): {per}")
    run = replace(run, sae=replace(run.sae, center_layers="on" if on else "off"))
    return run, (acc.means() if on else None)


def member_means(means: Tensor, run_layers: list[int], sae_layers: list[int]) -> Tensor:
    """The rows of `means` (one per run block) of an SAE's own blocks [len(sae_layers), d]."""
    return means[[run_layers.index(ly) for ly in sae_layers]]
