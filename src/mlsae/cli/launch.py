"""`--nproc N`: run the same command as N processes under torchrun (one machine).

`mlsae train --nproc 2 ARGS` runs torchrun's agent in this process, as `python -m
torch.distributed.run --standalone --nproc-per-node 2 -m mlsae train ARGS` would. The processes
write their last line (an error, a stop by a signal) to a file of `LAUNCH_DIR_ENV` instead of
printing it, so a failed job ends in one line, printed here: a rank killed by a signal is named
with the signal and the way to continue (from rank 0's line), else rank 0's own line, with its
exit code. Several machines: run torchrun yourself with its rendezvous options (README, "Several
processes and machines"); each process then prints its own line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from mlsae.core.errors import MlsaeError

LAUNCH_DIR_ENV = "MLSAE_LAUNCH_DIR"
"""Set by `--nproc` for its processes: the folder where each writes its last line (`rank<R>`)."""
HOW_KILLED = {
    signal.SIGKILL: "the system's out-of-memory killer or a user",
    signal.SIGSEGV: "a crash",
    signal.SIGABRT: "a crash",
    signal.SIGBUS: "a crash",
}

Nproc = Annotated[
    int,
    typer.Option(
        "--nproc",
        min=1,
        help="Processes on this machine (launches torchrun: training splits every batch, "
        "caching the shards; on GPUs one per GPU). Several machines: torchrun's own options.",
    ),
]


def without_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line running `mlsae ARGV` (ARGV without --nproc) on nproc
    processes of this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "mlsae",
        *without_nproc(argv),
    ]


def relaunch(nproc: int) -> None:
    """Run this command on nproc processes under torchrun's agent, then exit with the job's
    code, its failure told in one line (returns only when nproc is 1)."""
    if nproc <= 1:
        return
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise MlsaeError("--nproc launches torchrun: do not combine it with torchrun")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet_torchrun()
    sys.stdout.flush()
    sys.stderr.flush()
    folder = Path(tempfile.mkdtemp(prefix="mlsae-launch-"))
    os.environ[LAUNCH_DIR_ENV] = str(folder)
    try:
        run(parse_args(torchrun_command(nproc, sys.argv[1:])[3:]))
        code, line = 0, None
    except ChildFailedError as e:
        code, line = job_failure(e.failures, read_lines(folder), nproc)
    except SignalException as e:  # this process was stopped: the ranks were sent the signal
        lines = read_lines(folder)
        code, line = 128 + int(e.sigval), lines.get(0, f"stopped by signal {int(e.sigval)}")
    finally:
        os.environ.pop(LAUNCH_DIR_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
    if line is not None:
        print(f"mlsae: {line}", file=sys.stderr)
    raise SystemExit(code)


def quiet_torchrun() -> None:
    """Silence torchrun's agent (its warnings, its failure report): the job's failure is told
    in one line by `relaunch`."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def read_lines(folder: Path) -> dict[int, str]:
    """The last line each rank wrote to `folder` (`rank<R>` files; a rank that wrote none,
    or a garbled one, is left out)."""
    lines = {}
    for path in folder.glob("rank*"):
        try:
            rank, text = int(path.name[4:]), path.read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            continue
        if text:
            lines[rank] = " ".join(text.splitlines())
    return lines


def job_failure(failures: dict[int, Any], lines: dict[int, str], world: int) -> tuple[int, str]:
    """(exit code, line) of a failed job from torchrun's failures (rank -> ProcessFailure) and
    the ranks' own lines: a rank killed by a signal (other than the SIGTERM by which the agent
    stops the others) is the cause, else rank 0's line or the first failed rank's."""

    def order(item: tuple[int, Any]) -> tuple[bool, float, int]:
        rank, f = item
        killed = f.exitcode < 0 and -f.exitcode != signal.SIGTERM
        return (not killed, f.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    if failure.exitcode < 0:
        sig = signal.Signals(-failure.exitcode)
        how = HOW_KILLED.get(sig, "a signal")
        hint = next(
            (t for t in (lines.get(r, "") for r in sorted(lines)) if "continue with" in t), ""
        )
        then = "continue with" + hint.split("continue with", 1)[1] if hint else "see its log above"
        return 2, (
            f"error: rank {rank} of {world} was killed by signal {int(sig)} ({sig.name}: "
            f"{how}) and the job was stopped; {then}"
        )
    line = lines.get(0) or lines.get(rank)
    if line is None:
        line = (
            f"error: rank {rank} of {world} failed with exit code {failure.exitcode} "
            "(its traceback is above)"
        )
    return failure.exitcode or 2, line
