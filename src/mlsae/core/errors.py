"""One exception type for user-facing errors: the CLI prints its message as one line and exits 2.
Operating-system errors (a full disk, a read-only folder, ...) are described here in the same
one-line form, naming the path and what to do."""

from __future__ import annotations

import errno
import re


class MlsaeError(Exception):
    """A problem with the user's input or files (bad model, missing column, corrupt shard...)."""


class Interrupted(Exception):
    """Work stopped by a signal after saving what it could; the CLI exits 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this file system or `ulimit -f` allows: write elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose another location",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "this is a folder, not a file",
    errno.EEXIST: "this already exists",
    errno.ENOTEMPTY: "this folder is not empty",
    errno.EMFILE: "too many open files: raise `ulimit -n`",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EIO: "input/output error: the disk or file system is failing",
    errno.ENOMEM: "out of memory",
}


def os_error_message(e: OSError) -> str:
    """'PATH: what happened (what to do)' for an OSError, on one line."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = e.strerror or str(e) or type(e).__name__
    hint = _HINTS.get(e.errno) if e.errno is not None else None
    text = f"{what} ({hint})" if hint and hint != what.lower() else what
    return f"{where}: {text}" if where else text


_OS_ERROR = re.compile(r"os error (\d+)")


def os_error_in(e: BaseException, path: object = None) -> OSError | None:
    """The OSError behind a library's own exception type (safetensors reports 'os error 28'),
    with `path` as its file name; None if it is not one."""
    if isinstance(e, OSError):
        if e.filename is None and path is not None:
            e.filename = str(path)
        return e
    m = _OS_ERROR.search(str(e))
    if m is None:
        return None
    import os

    code = int(m.group(1))
    return OSError(code, os.strerror(code), None if path is None else str(path))


def is_out_of_memory(e: BaseException) -> bool:
    """A MemoryError, or torch's allocation failure (a RuntimeError)."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )
