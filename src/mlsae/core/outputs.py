"""Where a command may write: `check_output` runs before any work, so a bad output location fails
in a second instead of after an hour, and no output ever replaces an input or a folder or file of
another kind.

The kinds of folder mlsae makes are recognised by their marker files: an activation cache
(manifest.json), a training run (train_cfg.json), an SAE (cfg.json + sae.safetensors), a tuned
lens (lens.json, or the tuned-lens package's config.json + params.pt), an analysis
(analysis.json), an evolution output (evolution.json), a cross-layer matrix (cross.json) and a
checkpoint (state.pt). Nothing else may be written inside a cache or a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mlsae.core.errors import MlsaeError, os_error_message

MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cache", ("manifest.json",)),
    ("run", ("train_cfg.json",)),
    ("sae", ("cfg.json", "sae.safetensors")),
    ("lens", ("lens.json",)),
    ("lens", ("config.json", "params.pt")),
    ("analysis", ("analysis.json",)),
    ("evolution", ("evolution.json",)),
    ("cross", ("cross.json",)),
    ("checkpoint", ("state.pt",)),
    ("synth", ("truth.json", "truth.safetensors")),
    ("saelens", ("cfg.json", "sae_weights.safetensors")),
)
"""(kind, marker files that must all exist), in the order they are tried."""

OWNED = {
    "cache": ("manifest.json",),
    "run": ("train_cfg.json", "metrics.jsonl", "final_fvu.json", "per_layer.json"),
    "sae": ("cfg.json", "sae.safetensors"),
    "lens": ("lens.json", "lens.safetensors", "config.json", "params.pt"),
    "analysis": ("analysis.json", "latents.npz", "report.html"),
    "evolution": ("evolution.json", "graph.json", "graph.html"),
    "cross": ("cross.json",),
    "checkpoint": ("state.pt", "checkpoint.json"),
    "synth": ("truth.json", "truth.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "index": (),
    "eval": (),
}
"""The files each kind of folder is made of (another command must not write them)."""

NAMES = {
    "cache": "an activation cache",
    "run": "a training run",
    "sae": "an SAE folder",
    "lens": "a tuned-lens folder",
    "analysis": "an `mlsae analyze` output",
    "evolution": "an `mlsae evolution` output",
    "cross": "an `mlsae evaluate --cross` output",
    "checkpoint": "a training checkpoint",
    "eval": "an evaluation file",
    "synth": "a `mlsae synth generate` output",
    "saelens": "a SAELens folder",
    "index": "an explorer index",
    "export": "an `mlsae export` output",
}
CLOSED = frozenset({"cache", "checkpoint"})
"""Kinds whose folders hold only their own files."""

MIN_FREE_BYTES = 1 << 20
"""An output location with less free space than this is refused before any work."""


def folder_kind(path: Path) -> str | None:
    """The kind of mlsae folder `path` is (see MARKERS), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for kind, files in MARKERS:
        if all((path / f).is_file() for f in files):
            return kind
    return None


def _resolved(p: Path) -> Path:
    try:
        return Path(os.path.abspath(p.expanduser())).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare as written
        return Path(os.path.abspath(p))


def check_output(
    out: str | Path,
    kind: str,
    *,
    inputs: Iterable[str | Path | None] = (),
    file: bool = False,
    option: str = "--out",
    need_bytes: int = 0,
    apart: bool = False,
) -> Path:
    """MlsaeError unless a command that makes `kind` (a key of NAMES) may write `out` (a folder,
    or a file if `file`): not one of `inputs` (nor inside or around one if `apart`), not inside
    a cache or checkpoint, not a folder or file of another kind, not a device, FIFO, socket or
    symbolic link, and in a location that is writable and has at least `need_bytes` (and 1 MB)
    free. Returns `out`. Creates nothing."""
    out = Path(out)
    res = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        r_inp = _resolved(Path(inp))
        if r_inp == res:
            raise MlsaeError(f"{option} {out} is also an input of this command: choose another")
        if apart and (r_inp in res.parents or res in r_inp.parents):
            where = "inside" if r_inp in res.parents else "around"
            raise MlsaeError(
                f"{option} {out} is {where} this command's input {inp}: choose a "
                "location apart from it"
            )
    check_kind_of_file(out, option, file)
    for parent in res.parents:
        k = folder_kind(parent)
        if k in CLOSED:
            raise MlsaeError(
                f"{option} {out} is inside {NAMES[k]} ({parent}), which holds only "
                "its own files: choose a location outside it"
            )
    if out.exists():
        if file and out.is_dir():
            raise MlsaeError(
                f"{option} {out} is a folder: give a file name, e.g. {out / 'out.json'}"
            )
        if not file and not out.is_dir():
            raise MlsaeError(f"{option} {out} is a file: choose a folder")
        k = None if file else folder_kind(out)
        if k is not None and k != kind:
            raise MlsaeError(
                f"{option} {out} is {NAMES[k]}: choose a new {option} (it is left untouched)"
            )
    if file:
        k = folder_kind(res.parent)
        if k is not None and k != kind and out.name in OWNED[k]:
            raise MlsaeError(
                f"{option} {out} is a file of {NAMES[k]} ({res.parent}): choose another file name"
            )
    check_writable(res.parent if file else res, f"{option} {out}", need_bytes)
    return out


def check_kind_of_file(out: Path, option: str = "--out", file: bool = True) -> None:
    """MlsaeError if `out` is a device, a FIFO or a socket, or (a file output) a symbolic link:
    writing there would write into the device or replace the link, never what an output means.
    A folder reached through a link is checked where it resolves to."""
    if file and out.is_symlink():
        raise MlsaeError(
            f"{option} {out} is a symbolic link: give the path it points to, or a new name"
        )
    if out.exists() and not out.is_dir() and not out.is_file():
        raise MlsaeError(
            f"{option} {out} is not a regular file (a device, FIFO or socket): give a file name"
        )


def confined(base: Path, rel: str, what: str) -> Path:
    """`base / rel` for a path built from a pattern (a hook name, ...): MlsaeError unless it is
    relative, has no '..' and stays strictly inside `base` once symbolic links are resolved."""
    parts = Path(rel).parts
    if not rel.strip() or Path(rel).is_absolute() or ".." in parts or "\x00" in rel:
        raise MlsaeError(f"{what} {rel!r} is not a plain relative name: it must stay inside {base}")
    path = base / rel
    if _resolved(base) not in _resolved(path).parents:
        raise MlsaeError(f"{what} {rel!r} leads outside {base}")
    return path


def check_writable(folder: Path, what: str, need_bytes: int = 0) -> None:
    """MlsaeError unless files can be made in `folder` (or, if it does not exist yet, in its
    nearest existing ancestor, where it will be created) and the disk has room."""
    q = Path(folder)
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise MlsaeError(f"{what}: {q} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".mlsae-write-test-", dir=q)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        e.filename = str(q)
        raise MlsaeError(f"{what}: cannot write there ({os_error_message(e)})") from None
    try:
        free = shutil.disk_usage(q).free
    except OSError:
        return
    need = max(int(need_bytes), MIN_FREE_BYTES)
    if free < need:
        raise MlsaeError(
            f"{what}: the disk holding {q} has {_size(free)} free, this needs "
            f"about {_size(need)}: free some space or write elsewhere"
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover
