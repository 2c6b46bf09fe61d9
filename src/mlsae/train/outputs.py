"""What a training run reports besides its checkpoints: the metrics log (RUN/metrics.jsonl,
W&B), the SAE inputs of a batch (through the run's tuned lens if any), and the final per-layer
FVU pass (final_fvu.json)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, TextIO, cast

import torch

from mlsae.activations.source import ActivationSource, Batch
from mlsae.core.config import RunConfig
from mlsae.core.dist import Comm
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object, write_json
from mlsae.core.schema import from_dict, to_dict
from mlsae.sae.metrics import LayerMetrics, MetricsResult
from mlsae.train.checkpoint import open_metrics

log = logging.getLogger(__name__)

EVAL_VECTORS = 65536
"""Vectors of the final per-layer FVU pass (train tokens; `mlsae evaluate` does held-out)."""


class Progress:
    """What a run reports as it goes: one metrics.jsonl row per SAE and step (and W&B), rank 0
    only; the progress bar; vectors per second. A context manager (closes the log and W&B)."""

    def __init__(self, out: Path, run: RunConfig, start: int, total: int, comm: Comm) -> None:
        from tqdm import tqdm

        self.stack = contextlib.ExitStack()
        self.log: TextIO | None = None
        self.wb: Any = None
        if comm.main:
            self.log = self.stack.enter_context(open_metrics(out, start))
            if run.train.wandb:
                self.wb = wandb_start(out, run)
                self.stack.callback(self.wb.finish)
        self.bar = self.stack.enter_context(
            tqdm(
                total=total,
                initial=start,
                unit="step",
                desc="train",
                dynamic_ncols=True,
                disable=not comm.main,
            )
        )
        self.main, self.start_step = comm.main, start
        self.t_start = self.t_last = time.perf_counter()
        self.vectors = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def step(self, rows: list[dict[str, Any]], n_vectors: int, step: int, epoch: int) -> None:
        """Report step `step` (its rows: one per SAE that trained on it)."""
        now = time.perf_counter()
        vps = n_vectors / max(now - self.t_last, 1e-9)
        self.t_last, self.vectors = now, self.vectors + n_vectors
        if self.log is not None:
            for r in rows:
                row = {"step": step, "epoch": epoch, **r, "vectors_per_s": vps}
                self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        if self.wb is not None:
            self.wb.log(
                {f"{r['sae']}/{k}": v for r in rows for k, v in r.items() if k != "sae"}, step=step
            )
        self.bar.set_postfix(fvu=f"{rows[0]['fvu']:.3f}" if rows else "-", vec_s=f"{vps:.0f}")
        self.bar.update(1)

    def summary(self, step: int) -> None:
        """Log the session's throughput (rank 0)."""
        if self.vectors and self.main:
            rate = self.vectors / (time.perf_counter() - self.t_start)
            log.info(f"{step} steps; {rate:.0f} vectors/s over this session")


def sae_inputs(run: RunConfig, source: ActivationSource, layers: list[int]) -> Any:
    """Batch -> SAE inputs [B, d]: the stored vectors, or T_l of them when the run trains in
    tuned-lens space on model-space activations (SPEC 5)."""
    from mlsae.lens.tuned import resolve_space

    space = resolve_space(run.lens, source.lens, what="the run")
    lens = space.lens
    if lens is None or space.cache_in_lens:
        return lambda batch: batch.x
    if lens.d_model != source.d_model:
        raise MlsaeError(f"the lens has width {lens.d_model}, the activations {source.d_model}")
    lens.check_layers(layers)
    log.info(f"training in tuned-lens space: T_l applied on the fly ({run.lens})")
    return lambda batch: lens.forward_rows(batch.x, batch.layer)


def wandb_start(out: Path, run: RunConfig) -> Any:
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise MlsaeError("--wandb needs the wandb package (pip install wandb)") from None
    return wandb.init(
        project="mlsae", name=out.name, dir=str(out), config=run.to_dict(), resume="allow"
    )


# ----------------------------------------------------------------------------- after training


def training_sample(
    run: RunConfig, source: ActivationSource, members: list[Any]
) -> Iterator[Batch]:
    """The run's fixed sample of training vectors (SAE inputs): up to EVAL_VECTORS of them, the
    same on every call (seed + 1's order), whole tokens if a member's code is per token. The
    final FVU pass and the threshold calibration (`mlsae.train.calibrate`) read it."""
    cfg, layers = run.train, list(run.layers)
    to_sae = sae_inputs(run, source, layers)
    seen, grouped = 0, any(m.sae.token_code for m in members)  # crosscoder: whole tokens
    stream = source.shuffled(
        8192 // len(layers) * len(layers),
        layers,
        seed=cfg.seed + 1,
        buffer_shards=cfg.shuffle_buffer_shards,
        group_tokens=grouped,
    )
    with contextlib.closing(cast(Generator[Batch, None, None], stream)):  # ends its reader
        for batch in stream:
            batch.x = to_sae(batch)
            yield batch
            seen += len(batch)
            if seen >= EVAL_VECTORS:
                break


@torch.no_grad()
def final_fvu(
    run: RunConfig, members: list[Any], source: ActivationSource
) -> dict[str, MetricsResult]:
    """Per-layer FVU (raw space) of each SAE on the run's `training_sample`."""
    acc = {m.name: LayerMetrics(m.sae.cfg.layers, m.sae.cfg.d_in, m.sae.cfg.d_sae) for m in members}
    for batch in training_sample(run, source, members):
        for m in members:
            whole = m.sae(batch.x) if m.sae.token_code else None  # rows as batch.x
            for layer in m.sae.cfg.layers:
                sel = batch.layer == layer
                if sel.any():
                    x = batch.x[sel]
                    x_hat, enc = (
                        m.sae(x, layer) if whole is None else (whole[0][sel], whole[1].rows(sel))
                    )
                    acc[m.name].update(layer, x, x_hat, enc.top_indices, enc.top_acts)
    return {name: a.result() for name, a in acc.items()}


def write_final_fvu(path: Path, res: dict[str, MetricsResult]) -> None:
    """final_fvu.json: {SAE name: its metrics}."""
    write_json(path, {name: to_dict(r) for name, r in res.items()})


def read_final_fvu(path: Path) -> dict[str, MetricsResult]:
    """final_fvu.json read back, every SAE's metrics type-checked."""
    obj = read_json_object(path, "final FVU")
    return {name: from_dict(MetricsResult, r, f"{path}: {name}") for name, r in obj.items()}


def format_fvu(res: dict[str, MetricsResult]) -> str:
    """The final per-layer FVU of each SAE as text (final_fvu.json)."""
    lines = ["final per-layer FVU (training tokens):"]
    for name, r in res.items():
        per = " ".join(
            f"{ly}:{v:.3f}" if v is not None else f"{ly}:-"
            for ly, v in zip(r.layers, r.per_layer["fvu"], strict=True)
        )
        mean = r.mean["fvu"]
        lines.append(f"  {name}: mean {mean:.4f} | {per}" if mean is not None else f"  {name}: -")
    return "\n".join(lines)
