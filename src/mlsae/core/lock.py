"""One writer per folder: `folder_lock` holds an exclusive lock on FOLDER/.lock while a command
writes a run or a cache, so two `mlsae train --resume RUN` (or two `mlsae cache --out C`) cannot
interleave their files. The lock is an advisory `flock` on that file: the operating system
releases it when its process dies, however it dies, so a lock left by a killed process is never
stale; the file itself stays (empty of meaning) and holds the last holder's pid for messages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)

LOCK = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[None]:
    """Hold FOLDER/.lock exclusively (FOLDER must exist); MlsaeError naming the holder's pid if
    another process holds it. File systems without locks (some NFS) only get a warning."""
    path = Path(folder) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            who = f" (pid {holder[0]} on {holder[1]})" if len(holder) >= 2 else ""
            raise MlsaeError(
                f"{what} {folder} is in use by another mlsae process{who}: wait for it to "
                "finish or stop it, then try again"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning(
                f"{path}: this file system cannot lock files; do not run two mlsae "
                f"commands on {folder} at once"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
