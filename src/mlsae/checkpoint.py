"""Training checkpoints: everything needed to continue a run exactly (see train.py).

RUN/checkpoint/ holds `state.pt` (all SAE weights, Adam states, dead-latent counters, step,
epoch, batch index within the epoch, RNG state) and `checkpoint.json` (a readable summary).
It is written to a temp folder and swapped in by renames, so a kill at any moment leaves either
the previous or the new checkpoint (`recover_dir` picks the survivor).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mlsae.errors import MlsaeError
from mlsae.sae import recover_dir, replace_dir

CHECKPOINT = "checkpoint"
STATE = "state.pt"
VERSION = 1


def save_checkpoint(run: Path, state: dict[str, Any]) -> Path:
    """Write RUN/checkpoint atomically. state: step, epoch, batch, members{name: {...}}."""
    run = Path(run)
    dst = run / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run))
    try:
        payload = {**state, "version": VERSION, "rng": torch.get_rng_state()}
        torch.save(payload, tmp / STATE)
        summary = {k: state[k] for k in ("step", "epoch", "batch")}
        summary["members"] = sorted(state["members"])
        (tmp / "checkpoint.json").write_text(json.dumps(summary, indent=2))
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
