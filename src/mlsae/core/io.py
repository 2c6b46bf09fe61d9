"""Files written atomically and JSON read back with one error behaviour.

Every file mlsae writes goes to a temporary name beside its target and is renamed over it, so a
crash (or a full disk) leaves either the old file or the new one, never a torn one; an OSError
raised while writing names the target file (`mlsae.core.errors.os_error_message` turns it into
one line). Folders are swapped in with `replace_dir` / found again with `recover_dir`.
`read_json` turns every way a file can be unreadable into one `MlsaeError` naming the file;
`read_jsonl` reads a log whose last line a crash may have cut short.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsae.core.errors import MlsaeError, os_error_in

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

FIGURE_DPI = 110
"""Resolution of every PNG figure."""


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and replaces
    `path`, on error it is removed. `suffix` ends the temporary name (".tmp.png" keeps a type
    visible)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise _named(e, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.is_file():
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        err = os_error_in(e, path) if not isinstance(e, MlsaeError) else None
        if err is not None and err is not e:
            raise err from None
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk (a rename after this never exposes a torn file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(e: OSError, path: Path) -> OSError:
    """`e` naming `path` (not our temporary name) as the file it failed on."""
    if e.filename is None or str(e.filename).startswith(str(path.parent / f".{path.name}.")):
        return type(e)(e.errno, e.strerror, str(path)) if e.errno is not None else e
    return e


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    """Write bytes atomically (fsync: flush to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


class _Recorder:
    """A binary file that remembers the OSError of a failed write (torch.save reports a full disk
    as an unhelpful RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_stream(path: str | Path, writer: Callable[[Any], Any], fsync: bool = False) -> Path:
    """Atomic write through a function that writes to a binary file object (torch.save, ...);
    a failed write raises the OSError behind it, naming `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        rec = _Recorder(f)
        try:
            writer(rec)
        except Exception as e:
            if rec.error is not None and rec.error is not e:
                raise rec.error from None
            raise
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """A JSON-ready copy: NaN / inf become None, numpy scalars and arrays Python values."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / torch values
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write JSON atomically (non-finite floats become null: JSON has no NaN)."""
    sep = (",", ":") if indent is None else None
    return write_text(path, json.dumps(json_safe(obj), indent=indent, separators=sep))


def write_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (tensors made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:  # a SafetensorError 'os error 28' becomes that OSError
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def save_figure(fig: Figure, path: str | Path, dpi: int = FIGURE_DPI) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def write_with(path: str | Path, writer: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Atomic write through a function that writes to a given path (np.savez, ...)."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; MlsaeError naming the file (and `what` it should be) otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlsaeError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MlsaeError(f"{path}: unreadable {what} ({e})") from None


def read_jsonl(path: str | Path, what: str = "log") -> list[Any]:
    """The JSON values of a JSON-lines file, one per non-empty line. A last line that does not
    parse (a write a crash cut short) is dropped; any other bad line is an MlsaeError naming the
    file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MlsaeError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    lines = raw.split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as e:
            if i == last:
                break  # torn by a crash
            raise MlsaeError(f"{path}:{i + 1}: not a JSON line ({e})") from None
    return out


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """`read_json` that also requires a JSON object at the top."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise MlsaeError(f"{path}: the {what} must be a JSON object, not {type(obj).__name__}")
    return obj


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder src to dst, replacing dst; dst is never missing except between two renames
    (a stale `.dst.old` is then recovered by `recover_dir`)."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path) -> Path:
    """The folder written by `replace_dir`, or its previous version if killed mid-swap."""
    old = dst.with_name(f".{dst.name}.old")
    return old if not dst.exists() and old.exists() else dst


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (`replace_dir`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise _named(e, path) from None
    try:
        yield tmp
        replace_dir(tmp, path)
    except OSError as e:  # name the file as it will be called, not its temporary name
        name = str(e.filename or "")
        if name.startswith(str(tmp)):
            e.filename = str(path / Path(name).relative_to(tmp))
        elif not name:
            e.filename = str(path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
