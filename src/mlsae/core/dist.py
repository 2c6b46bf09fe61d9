"""Processes of one job (torchrun): `Comm`, the few collectives mlsae needs, and `session`, which
joins the process group when the job was launched with several processes.

`torchrun --nproc-per-node N -m mlsae train ...` (or `mlsae train --nproc N`) starts N copies of
the command with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; `session` then
initialises `torch.distributed` (gloo for CPU tensors, plus NCCL for CUDA tensors on GPUs) with a
timeout on every collective (`MLSAE_DIST_TIMEOUT` seconds, default 600), so a process that dies
or hangs stops the others with an error instead of a hang. A single process gets the same
interface with every collective the identity.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MLSAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective may wait for the other processes (model loading, a checkpoint write)."""
FAULT_ENV = "MLSAE_FAULT_KILL"
"""Fault injection for the tests: `RANK:N` makes process RANK of a job kill itself (SIGKILL) at
its N-th call of `DistComm.any` (training calls it once a step, after the step)."""


def env_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment ((0, 1) outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MlsaeError("RANK and WORLD_SIZE must be integers (set by torchrun)") from None


def is_main_process() -> bool:
    """False in the processes of a torchrun job other than rank 0 (they print nothing)."""
    return env_world()[0] == 0


class Comm:
    """One process: every collective is the identity. `DistComm` is the multi-process one."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def sum_(self, t: Tensor) -> Tensor:
        """t summed over the processes, in place; returns t."""
        return t

    def max_(self, t: Tensor) -> Tensor:
        """t's element-wise maximum over the processes, in place; returns t."""
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        """rank 0's t, in place on every process; returns t."""
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """rank 0's obj (any picklable object) on every process."""
        return obj

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every process's rows of x [n_r, ...] in rank order: [sum_r n_r, ...] (n_r may differ)."""
        return x

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's obj (picklable), in rank order, on every process."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every process."""

    def count(self, n: int) -> int:
        """n summed over the processes."""
        return n

    def any(self, flag: bool) -> bool:
        """True if flag is True on any process."""
        return flag


class DistComm(Comm):
    """The processes of a torch.distributed group (tensors on the CPU go through gloo)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def sum_(self, t: Tensor) -> Tensor:
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t

    def max_(self, t: Tensor) -> Tensor:
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        self.dist.broadcast(t, src=0)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj if self.main else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rows(self, x: Tensor) -> Tensor:
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        self.dist.all_gather(sizes, n)
        most = max(int(s) for s in sizes)
        pad = x.new_zeros(most, *x.shape[1:])
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        self.dist.all_gather(parts, pad.contiguous())
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()

    def count(self, n: int) -> int:
        return int(self.sum_(torch.tensor([n], dtype=torch.int64)))

    def any(self, flag: bool) -> bool:
        self.anys = getattr(self, "anys", 0) + 1
        if injected_kill(self.rank) == self.anys:
            log.warning(f"rank {self.rank}: killing itself ({FAULT_ENV}, call {self.anys} of any)")
            os.kill(os.getpid(), signal.SIGKILL)
        return bool(self.max_(torch.tensor([int(flag)], dtype=torch.int64)))


def injected_kill(rank: int) -> int | None:
    """The call of `any` at which this rank kills itself (`MLSAE_FAULT_KILL=RANK:N`), or None."""
    raw = os.environ.get(FAULT_ENV, "")
    who, _, when = raw.partition(":")
    if not (who.isdigit() and when.isdigit()) or int(who) != rank:
        return None
    return int(when)


def timeout_s() -> float:
    """The collectives' timeout: `MLSAE_DIST_TIMEOUT` seconds, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise MlsaeError(f"{TIMEOUT_ENV} must be a number of seconds, not {raw!r}") from None
    if not value > 0:
        raise MlsaeError(f"{TIMEOUT_ENV} must be > 0")
    return value


@contextlib.contextmanager
def session(device: torch.device | None = None) -> Iterator[Comm]:
    """The job's Comm: a process group when WORLD_SIZE > 1 (torchrun), joined here and left on
    exit; else the single-process Comm. `device`: this process's device, if known (with CUDA,
    NCCL serves CUDA tensors and gloo CPU ones)."""
    rank, world = env_world()
    if world <= 1:
        yield Comm()
        return
    import torch.distributed as dist

    if dist.is_initialized():  # an enclosing session (or the caller) owns the group
        yield DistComm()
        return
    cuda = torch.cuda.is_available()  # NCCL joins lazily, on the first CUDA collective
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    elif cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    # torch._dynamo (imported by the first torch.optim optimizer) keeps references to a process
    # group that exists when it is imported: destroy_process_group then leaves gloo's threads
    # running, and their destructors abort the process at exit ("terminate called without an
    # active exception", issue 29 class 13). Imported before the group exists, it holds none.
    import torch._dynamo as _dynamo  # noqa: F401

    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:
        raise MlsaeError(
            f"rank {rank}: cannot join the {world}-process group: {first_line(e)}"
        ) from None
    log.info(f"rank {rank} of {world} joined the process group ({backend})")
    try:
        yield DistComm()
        with contextlib.suppress(Exception):  # leave together: a rank tearing gloo down while
            dist.barrier()  # the other still talks to it aborted ("terminate called ...")
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def first_line(e: BaseException) -> str:
    """An exception's first line (collective errors carry long C++ traces)."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
