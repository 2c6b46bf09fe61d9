"""The state of a training run (`TrainState`: every SAE's weights, Adam state and dead-latent
counter, and the position in the data) and its checkpoint in RUN/checkpoint/.

RUN/checkpoint/ holds `state.pt` (the state, plus the torch RNG state) and `checkpoint.json` (a
readable summary with the sha256 of state.pt). It is written to a temp folder and swapped in by
renames, so a kill at any moment leaves either the previous or the new checkpoint (`recover_dir`
picks the survivor). Reading it back checks everything before any of it is used: the checksum
(flipped bits are a corrupt checkpoint), the format version, every key, type, shape and dtype
against the run's own SAEs and optimizers, and the position against the run's plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from mlsae.core.dist import Comm
from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, read_jsonl, recover_dir, write_bytes, write_json, write_text
from mlsae.core.schema import from_dict
from mlsae.train.member import Member

CHECKPOINT = "checkpoint"
STATE = "state.pt"
SUMMARY = "checkpoint.json"
VERSION = 2
"""2: checkpoint.json carries the sha256 of state.pt. 1 (no checksum) is still read."""


@dataclass
class TrainState:
    """Everything a run needs to continue exactly: the members (weights, Adam, dead counters)
    and where the run stands in its data. `step` counts optimizer steps over the whole run;
    `epoch` and `batch` (batches of this epoch already trained on) place the next batch."""

    members: list[Member]
    step: int = 0
    epoch: int = 0
    batch: int = 0
    world: int = 1
    saved_step: int = field(default=0, compare=False)
    """The step of the last checkpoint written or read (named when training diverges)."""

    def advance(self) -> None:
        """One batch trained on."""
        self.step += 1
        self.batch += 1

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0

    def save(self, run: Path, comm: Comm) -> None:
        """Checkpoint the state into RUN/checkpoint and each SAE into its folder (rank 0 writes;
        the others only record the step). Never reached with non-finite weights: the step checks
        first, but a checkpoint is not the place to find out."""
        bad = [m.name for m in self.members if not _finite(m.sae.parameters())]
        if bad:
            raise MlsaeError(f"SAE(s) {bad} hold NaN or inf weights at step {self.step}: not saved")
        self.saved_step = self.step
        if not comm.main:
            return
        payload = {
            "version": VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "world": self.world,
            "rng": torch.get_rng_state(),
            "members": {m.name: m.state() for m in self.members},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        summary = {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "members": sorted(payload["members"]),
            "version": VERSION,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        with atomic_dir(Path(run) / CHECKPOINT) as tmp:
            write_bytes(tmp / STATE, data)
            write_json(tmp / SUMMARY, summary)
        for m in self.members:
            m.sae.save(Path(run) / m.name)

    def load(self, run: Path, comm: Comm, plan: Plan) -> bool:
        """Continue from RUN's checkpoint, if it has one (False if not). Rank 0 reads it and
        sends it to the others; everything is checked (MlsaeError naming the file) before the
        members are touched; the torch RNG state is restored."""
        where = str(recover_dir(Path(run) / CHECKPOINT) / STATE)
        payload: Any = None
        if comm.main:
            try:
                payload = read_checkpoint(Path(run))
            except MlsaeError as e:
                comm.broadcast_object({"error": str(e)})
                raise
        payload = comm.broadcast_object(payload)
        if payload is None:
            return False
        if "error" in payload:
            raise MlsaeError(f"rank 0: {payload['error']}")
        self._check(payload, where, plan)
        for m in self.members:
            m.load(payload["members"][m.name])
        self.step, self.epoch, self.batch = payload["step"], payload["epoch"], payload["batch"]
        self.saved_step = self.step
        torch.set_rng_state(payload["rng"])
        return True

    def _check(self, payload: dict[str, Any], where: str, plan: Plan) -> None:
        world = payload.get("world", 1)
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise MlsaeError(f"{where}: world: expected an integer >= 1, got {world!r}")
        if world != self.world:
            raise MlsaeError(
                f"{Path(where).parents[1]} was trained on {world} process(es): "
                f"resume it with --nproc {world} (the data order depends on it)"
            )
        plan.check(payload["step"], payload["epoch"], payload["batch"], where)
        names = sorted(payload["members"])
        if names != sorted(m.name for m in self.members):
            raise MlsaeError(
                f"{where}: holds SAE(s) {names}, this run trains "
                f"{sorted(m.name for m in self.members)}: not this run's"
            )
        for m in self.members:
            check_member_state(m, payload["members"][m.name], f"{where}: members.{m.name}")


@dataclass
class Plan:
    """How far a run goes: `per_epoch` steps per epoch (every process's share of a global
    batch), `epochs` passes, `total` optimizer steps in all (--max-steps may cut it)."""

    per_epoch: int
    epochs: int
    total: int

    def check(self, step: int, epoch: int, batch: int, where: str) -> None:
        """MlsaeError unless (step, epoch, batch) is a position of this plan: within it, and
        consistent (every step trains one batch; an epoch is `per_epoch` batches)."""
        if step > self.total:
            raise MlsaeError(
                f"{where}: step {step} is beyond this run's plan of {self.total} "
                "steps (--max-steps may only be raised on resume)"
            )
        if step != epoch * self.per_epoch + batch or batch > self.per_epoch:
            raise MlsaeError(
                f"{where}: step {step} is not epoch {epoch}, batch {batch} of this "
                f"run's epochs of {self.per_epoch} batches: not this run's"
            )


def read_checkpoint(run: Path) -> dict[str, Any] | None:
    """RUN's latest checkpoint payload (None if there is none yet): checksum, version and the
    types of its top-level fields checked; MlsaeError naming the file otherwise."""
    folder = recover_dir(Path(run) / CHECKPOINT)
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MlsaeError(f"{path}: unreadable checkpoint ({e.strerror})") from None
    digest = _recorded_sha256(folder)
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise MlsaeError(
            f"{path}: corrupt checkpoint (its sha256 is not the one recorded in "
            f"{SUMMARY}): restore the run folder from a copy, or start again"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a corrupt file
        raise MlsaeError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("version") not in (1, VERSION):
        raise MlsaeError(f"{path}: not an mlsae checkpoint (version 1 or {VERSION})")
    if state["version"] == VERSION and digest is None:
        raise MlsaeError(f"{path}: corrupt checkpoint ({SUMMARY} records no sha256)")
    from_dict(CheckpointInfo, {k: state.get(k) for k in ("step", "epoch", "batch")}, str(path))
    rng, members = state.get("rng"), state.get("members")
    if not isinstance(rng, Tensor) or rng.dtype != torch.uint8:
        raise MlsaeError(f"{path}: rng: expected a byte tensor")
    if not isinstance(members, dict) or not all(isinstance(v, dict) for v in members.values()):
        raise MlsaeError(f"{path}: members: expected an object of SAE states")
    return state


def _recorded_sha256(folder: Path) -> str | None:
    """The sha256 checkpoint.json records (None: a version-1 checkpoint, which has none)."""
    path = folder / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise MlsaeError(f"{path}: corrupt checkpoint (its summary is unreadable)") from None
    if not isinstance(summary, dict) or "sha256" not in summary:
        return None
    digest = summary["sha256"]
    if not isinstance(digest, str) or len(digest) != 64:
        raise MlsaeError(f"{path}: corrupt checkpoint (sha256: expected 64 hex digits)")
    return digest


def check_member_state(m: Member, st: dict[str, Any], where: str) -> None:
    """MlsaeError unless `st` (a `Member.state()` read back) fits member `m`: the same weights
    (names, shapes, dtypes, finite), an Adam state of the same shapes, a dead counter of d_sae."""
    for key in ("sae", "opt", "since", "initialized"):
        if key not in st:
            raise MlsaeError(f"{where}: missing {key!r}")
    want = m.sae.state_dict()
    got = st["sae"]
    if not isinstance(got, dict) or sorted(got) != sorted(want):
        have = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise MlsaeError(f"{where}.sae: holds {have}, the SAE has {sorted(want)}")
    for k, w in want.items():
        _check_tensor(got[k], w.shape, w.dtype, f"{where}.sae.{k}")
    since = st["since"]
    _check_tensor(since, m.since.shape, m.since.dtype, f"{where}.since")
    if not isinstance(st["initialized"], bool):
        raise MlsaeError(f"{where}.initialized: expected true or false")
    _check_adam(m, st["opt"], bool(st["initialized"]), f"{where}.opt")


def _check_adam(m: Member, opt: Any, stepped: bool, where: str) -> None:
    params = [p for g in m.opt.param_groups for p in g["params"]]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    state = opt.get("state") if isinstance(opt, dict) else None
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise MlsaeError(f"{where}: expected an optimizer state (state, param_groups)")
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    if len(groups) != len(m.opt.param_groups) or len(ids) != len(params):
        raise MlsaeError(f"{where}: {len(ids)} parameter(s), the SAE has {len(params)}")
    for g in groups:
        for key in ("lr", "eps"):
            v = g.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise MlsaeError(f"{where}.param_groups.{key}: expected a number, got {v!r}")
    for i, p in zip(ids, params, strict=True):
        s = state.get(i)
        if s is None:
            if stepped:
                raise MlsaeError(f"{where}: no Adam state for parameter {i}")
            continue
        if not isinstance(s, dict):
            raise MlsaeError(f"{where}.state.{i}: expected an object")
        for key in ("exp_avg", "exp_avg_sq"):
            _check_tensor(s.get(key), p.shape, p.dtype, f"{where}.state.{i}.{key}")
        if not isinstance(s.get("step"), Tensor) or s["step"].numel() != 1:
            raise MlsaeError(f"{where}.state.{i}.step: expected a one-element tensor")


def _check_tensor(t: Any, shape: torch.Size, dtype: torch.dtype, where: str) -> None:
    if not isinstance(t, Tensor):
        raise MlsaeError(f"{where}: expected a tensor, got {type(t).__name__}")
    if t.shape != shape or t.dtype != dtype:
        raise MlsaeError(f"{where}: {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
    if t.is_floating_point() and not _finite([t]):
        raise MlsaeError(f"{where}: holds NaN or inf")


def _finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
            r
            for i, r in enumerate(rows)
            if from_dict(MetricsRow, r, f"{path} row {i + 1}").step <= keep_step
        ]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a")  # noqa: SIM115 - closed by the caller
