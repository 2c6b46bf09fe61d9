"""`--nproc N`: run the same command as N processes under torchrun (one machine).

`mlsae train --nproc 2 ARGS` becomes `python -m torch.distributed.run --standalone
--nproc-per-node 2 -m mlsae train ARGS` (the process is replaced by torchrun, so signals and the
exit code are torchrun's). Several machines: run torchrun yourself with its rendezvous options
(README, "Several processes and machines").
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mlsae.core.errors import MlsaeError

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
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "mlsae", *without_nproc(argv)]  # fmt: skip


def relaunch(nproc: int) -> None:
    """Replace this process by torchrun running this command on nproc processes (returns
    only when nproc is 1)."""
    if nproc <= 1:
        return
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise MlsaeError("--nproc launches torchrun: do not combine it with torchrun")
    cmd = torchrun_command(nproc, sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
