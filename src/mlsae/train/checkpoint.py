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
from pathlib import Path
from typing import Any, TextIO

import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, recover_dir, write_json

CHECKPOINT = "checkpoint"
STATE = "state.pt"
VERSION = 1


def save_checkpoint(run: Path, state: dict[str, Any]) -> Path:
    """Write RUN/checkpoint atomically. state: step, epoch, batch, members{name: {...}}."""
    run = Path(run)
    dst = run / CHECKPOINT
    with atomic_dir(dst) as tmp:
        payload = {**state, "version": VERSION, "rng": torch.get_rng_state()}
        torch.save(payload, tmp / STATE)
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
    torch.set_rng_state(state["rng"])
    return state


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
    """RUN/metrics.jsonl opened for appending, cut back to steps <= keep_step (resume)."""
    path = out / "metrics.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= keep_step]
        path.write_text("".join(ln + "\n" for ln in kept))
    return open(path, "a")  # noqa: SIM115 - closed by the caller
