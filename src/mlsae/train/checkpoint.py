"""The training run folder: train_cfg.json, checkpoints, metrics log, stop signals (train.py).

RUN/checkpoint/ holds `state.pt` (all SAE weights, Adam states, dead-latent counters, step,
epoch, batch index within the epoch, RNG state) and `checkpoint.json` (a readable summary).
It is written to a temp folder and swapped in by renames, so a kill at any moment leaves either
the previous or the new checkpoint (`recover_dir` picks the survivor).
"""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, read_jsonl, recover_dir, write_json, write_stream, write_text
from mlsae.core.schema import from_dict

CHECKPOINT = "checkpoint"
STATE = "state.pt"
VERSION = 1


def save_checkpoint(run: Path, state: dict[str, Any]) -> Path:
    """Write RUN/checkpoint atomically. state: step, epoch, batch, members{name: {...}}."""
    run = Path(run)
    dst = run / CHECKPOINT
    with atomic_dir(dst) as tmp:
        payload = {**state, "version": VERSION, "rng": torch.get_rng_state()}
        write_stream(tmp / STATE, lambda f: torch.save(payload, f))
        summary = {k: state[k] for k in ("step", "epoch", "batch")}
        summary["members"] = sorted(state["members"])
        write_json(tmp / "checkpoint.json", summary)
    return dst


def load_checkpoint(run: Path) -> dict[str, Any] | None:
    """The latest checkpoint of RUN (restores the torch RNG), or None if there is none yet."""
    path = recover_dir(Path(run) / CHECKPOINT) / STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a corrupt file
        raise MlsaeError(f"{path}: unreadable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise MlsaeError(f"{path}: not an mlsae checkpoint (version {VERSION})")
    from_dict(CheckpointInfo, {k: state.get(k) for k in ("step", "epoch", "batch")}, str(path))
    rng, members = state.get("rng"), state.get("members")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise MlsaeError(f"{path}: rng: expected a byte tensor")
    if not isinstance(members, dict) or not all(isinstance(v, dict) for v in members.values()):
        raise MlsaeError(f"{path}: members: expected an object of SAE states")
    torch.set_rng_state(rng)
    return state


@dataclass
class CheckpointInfo:
    """Where a checkpoint stands (the summary in checkpoint.json, and in state.pt)."""

    step: int
    epoch: int
    batch: int

    def __post_init__(self) -> None:
        if min(self.step, self.epoch, self.batch) < 0:
            raise MlsaeError("step, epoch and batch must be >= 0")


@dataclass
class MetricsRow:
    """The fields of a metrics.jsonl row that resuming relies on (others are free)."""

    step: int
    epoch: int
    sae: str


class StopSignals:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def open_metrics(out: Path, keep_step: int) -> TextIO:
    """RUN/metrics.jsonl opened for appending, cut back to steps <= keep_step (resume); a last
    line a crash cut short is dropped, any other malformed row is an MlsaeError."""
    path = out / "metrics.jsonl"
    if path.exists():
        rows = read_jsonl(path, "metrics log")
        kept = [
            r for i, r in enumerate(rows)
            if from_dict(MetricsRow, r, f"{path} row {i + 1}").step <= keep_step
        ]  # fmt: skip
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a")  # noqa: SIM115 - closed by the caller
