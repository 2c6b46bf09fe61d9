"""The memory (and disk) a training run needs, estimated from its shapes before anything is
allocated or written, so `--expansion-factor 100000` is refused with the numbers instead of an
allocation traceback, and a run does not fill the disk at its first checkpoint."""

from __future__ import annotations

from mlsae.activations.source import ActivationSource
from mlsae.core.config import RunConfig
from mlsae.core.memory import check_memory, gb

FINAL_CHUNK = 8192
"""Rows encoded at once by the final FVU pass (train.loop.final_fvu)."""


def training_memory(run: RunConfig, source: ActivationSource) -> dict[str, int]:
    """Bytes by use: `state` = every member's fp32 weights, gradients, two Adam moments and one
    checkpoint copy (5 x 4 bytes per parameter); `step` = the largest member's [B, d_sae]
    temporaries of one step (pre-activations, AuxK's dead pre-activations and their top-k: 3 x 4
    bytes each), or of the final FVU pass; `data` = the two shuffle buffers and a batch."""
    d, cfg = run.d_in, run.train
    per_layer = run.mode == "per_layer"
    step = 0
    for m in run.members:
        d_sae = d * m.expansion_factor
        step = max(step, 3 * 4 * cfg.batch_tokens * d_sae, 4 * FINAL_CHUNK * d_sae)
    read = cfg.batch_tokens * (len(run.layers) if per_layer else 1)
    blocks = [source.block_tokens(i) for i in range(source.n_blocks)] or [0]
    itemsize = source.dtype.itemsize
    buffer = min(cfg.shuffle_buffer_shards, len(blocks)) * max(blocks) * len(run.layers)
    data = 2 * buffer * d * itemsize + 2 * read * d * 4
    return {"state": 20 * n_parameters(run), "step": step, "data": data}


def n_parameters(run: RunConfig) -> int:
    """Parameters of all the run's SAEs (W_enc, W_dec, b_enc, b_dec)."""
    d = run.d_in
    return sum(2 * d * d * m.expansion_factor + d * m.expansion_factor + d for m in run.members)


def training_disk(run: RunConfig) -> int:
    """Bytes of disk a run needs at its peak: while a checkpoint is swapped in, the old and the
    new one (fp32 weights and two Adam moments: 12 bytes per parameter) and the old and new SAE
    folders (4 bytes per parameter) exist side by side."""
    return 2 * 16 * n_parameters(run)


def check_training_memory(run: RunConfig, source: ActivationSource) -> None:
    """MlsaeError with the estimate if the run would not fit in the available memory."""
    m = training_memory(run, source)
    n = len(run.members)
    what = (
        f"the {n} SAE{'s' if n > 1 else ''} of this run (weights, gradients and Adam states "
        f"{gb(m['state'])}, a step's activations {gb(m['step'])}, data {gb(m['data'])})"
    )
    check_memory(
        sum(m.values()),
        what,
        "lower --expansion-factor or --batch-tokens (or --shuffle-buffer-shards)",
    )
