"""Faults on the surfaces of issue 29: `mlsae index` / `export` / `import` outputs, a full disk
under the index's SQLite writes, import type checks, the explorer's data and its live server,
the live stream's resume fingerprint, context length vs the model's positions, model folders
and corpora. Each class: one `MlsaeError` line (or a clean result), nothing existing damaged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, write_word_corpus
from explore_fixtures import indexed_world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.outputs import check_output, confined
from mlsae.explore import db as index_db
from mlsae.explore.db import IndexDB, Writer, check_index_output

pytestmark = pytest.mark.usefixtures("one_thread")


def digest(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        for f in [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return indexed_world(tmp_path_factory.mktemp("faults_surfaces"))


# ----------------------------------------------------------------------------- 1. outputs


def test_index_output_never_replaces_an_input_or_another_kind(world, tmp_path) -> None:
    run, cache = world["run"], world["cache"]
    before = digest(run, cache)
    shard = next(cache.glob("shard_*.safetensors"))
    for bad in (
        run / "sae" / "sae.safetensors",
        run / "sae" / "cfg.json",
        cache / "manifest.json",
        shard,
        cache / "new.sqlite",
    ):
        with pytest.raises(MlsaeError):
            check_index_output(bad, inputs=[run, cache])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MlsaeError, match="not an explorer index"):
        check_index_output(tmp_path / "notes.txt", inputs=[run])
    check_index_output(run / "explore.sqlite", inputs=[run, cache])  # the default: allowed
    assert digest(run, cache) == before


def test_devices_fifos_and_symlinks_are_not_output_files(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "t.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "t.txt")
    bad = [tmp_path / "fifo", tmp_path / "link"]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", 0o666 | 0o020000, os.makedev(1, 3))
        bad.append(tmp_path / "null")
    for p in bad:
        with pytest.raises(MlsaeError, match="symbolic link|not a regular file"):
            check_output(p, "eval", file=True)
    check_output(tmp_path / "t.txt", "eval", file=True)


def test_pattern_paths_stay_inside_out(tmp_path) -> None:
    for rel in ("../../x.0", str(tmp_path / "abs.0"), "", "a/../../b"):
        with pytest.raises(MlsaeError):
            confined(tmp_path / "out", rel, "--hook-format")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "esc").symlink_to(tmp_path)
    with pytest.raises(MlsaeError, match="outside"):
        confined(tmp_path / "out", "esc/x", "--hook-format")
    assert confined(tmp_path / "out", "blocks.0", "x") == tmp_path / "out" / "blocks.0"


# ----------------------------------------------------------------------------- 2. export


def test_export_refuses_escapes_and_other_kinds(world, tmp_path) -> None:
    from mlsae.interchange.saelens import export_saelens

    run = tmp_path / "run"
    shutil.copytree(world["run"] / "sae", run / "sae")
    other = tmp_path / "o" / "r0"
    shutil.copytree(world["run"] / "sae", other)  # an SAE folder where a hook folder would go
    before = digest(run, other)
    cases = [
        (tmp_path / "o", "../../x.{layer}"),
        (tmp_path / "o", str(tmp_path / "a.{layer}")),
        (tmp_path / "o", "r{layer}"),
        (run / "inside", "h.{layer}"),
        (world["cache"] / "x", "h.{layer}"),
    ]
    for out, fmt in cases:
        with pytest.raises(MlsaeError):
            export_saelens(run, out, hook_format=fmt, approximate=True)
    assert digest(run, other) == before
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob("a.*"))
    folders = export_saelens(run, tmp_path / "new", hook_format="h.{layer}", approximate=True)
    assert [f.name for f in folders] == ["h.0", "h.1", "h.2"]
    assert not list((tmp_path / "new").glob(".mlsae-export.*"))  # the staging folder is gone


# ----------------------------------------------------------------------------- 3. full disk


def _fill_db(w: Writer, n: int) -> None:
    w.con.execute("CREATE TABLE blob(x BLOB)")
    w.con.executemany("INSERT INTO blob VALUES (?)", [(os.urandom(4096),) for _ in range(n)])


def test_a_failed_commit_never_replaces_the_index(tmp_path, monkeypatch) -> None:
    """The index's last writes (indexes, commit) fail: the old database stays as it was."""
    path = tmp_path / "explore.sqlite"
    with Writer(path) as w:
        _fill_db(w, 4)
    before = path.read_bytes()

    class FullOnCommit:
        def __init__(self, con):
            self.con = con

        def __getattr__(self, name):
            return getattr(self.con, name)

        def commit(self):
            raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(OSError) as e, Writer(path) as w:
        _fill_db(w, 8)
        w.con = FullOnCommit(w.con)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["explore.sqlite"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_leaves_a_good_index_intact(tmp_path, monkeypatch) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = disk / "explore.sqlite"
        with Writer(path) as w:
            _fill_db(w, 40)  # ~170 kB
        before = path.read_bytes()
        with pytest.raises(OSError) as e, Writer(path) as w:
            _fill_db(w, 400)  # ~1.6 MB: more than the disk holds
        assert e.value.errno == errno.ENOSPC
        assert path.read_bytes() == before
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
    finally:
        subprocess.run(["umount", str(disk)])


# ----------------------------------------------------------------------------- 6. import


def _sparsify(d: Path, k: object = 4, scale: float = 1.0) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    t = {
        "encoder.weight": torch.randn(64, 32, generator=g),
        "encoder.bias": torch.zeros(64),
        "W_dec": torch.randn(64, 32, generator=g) * scale,
        "b_dec": torch.zeros(32),
    }
    save_file(t, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"k": k, "activation": "topk"}))
    return d


def _paper(d: Path, **cfg) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "encoder.weight": torch.randn(64, 32, generator=g),
            "decoder.weight": torch.randn(32, 64, generator=g),
            "pre_encoder_bias": torch.zeros(32),
        },
        str(d / "model.safetensors"),
    )
    base = {"k": 4, "standardize": True, "layers": [1], "model_name": "m"}
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    return d


@pytest.mark.parametrize(
    "make",
    [
        lambda d: _sparsify(d, k="4"),
        lambda d: _sparsify(d, k=4.7),
        lambda d: _sparsify(d, k=[4]),
        lambda d: _sparsify(d, scale=float("nan")),
        lambda d: _paper(d, layers="012"),
        lambda d: _paper(d, k=4.7),
        lambda d: _paper(d, standardize="no"),
        lambda d: _paper(d, model_name=5),
        lambda d: _paper(d, layers=[-1]),
    ],
)
def test_import_refuses_wrong_types_and_nonfinite_weights(tmp_path, make) -> None:
    from mlsae.interchange.convert import import_command

    src = make(tmp_path / "layers.1")
    fmt = "sparsify" if (src / "sae.safetensors").exists() else "mlsae-hub"
    with pytest.raises(MlsaeError):
        if fmt == "sparsify":
            import_command(src, fmt, tmp_path / "out", model="m", layers=[1])
        else:  # the model and layers from the checkpoint's own config
            import_command(src, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_pickle_payload_as_one_error(tmp_path) -> None:
    import pickle

    from mlsae.interchange.convert import import_command

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    src = _paper(tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(MlsaeError, match="unreadable weights"):
        import_command(src, "mlsae-hub", tmp_path / "out", model="m")


def test_import_output_inside_its_source_or_a_cache_is_refused(world, tmp_path) -> None:
    from mlsae.interchange.convert import import_command

    src = _sparsify(tmp_path / "layers.1")
    for out in (src / "sub", world["cache"] / "sub"):
        with pytest.raises(MlsaeError):
            import_command(src, "sparsify", out, model="m", layers=[1])
        assert not out.exists()
    written = import_command(src, "sparsify", tmp_path / "ok", model="m", layers=[1])
    from mlsae.sae.folders import load_sae

    assert load_sae(written[0]).cfg.k == 4  # what import writes, load_sae reads


# ----------------------------------------------------------------------------- 4 / 5 / 12


def _edited_index(world, tmp_path: Path, sql: str) -> Path:
    p = tmp_path / "explore.sqlite"
    shutil.copy2(world["run"] / "explore.sqlite", p)
    con = sqlite3.connect(p)
    con.executescript(sql)
    con.commit()
    con.close()
    return p


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE latents;",
        "UPDATE meta SET value = 'nope' WHERE key = 'window';",
        "DELETE FROM meta WHERE key = 'context_length';",
        "UPDATE meta SET value = '\"8\"' WHERE key = 'top_n';",
        "UPDATE examples SET act = x'00' WHERE (sae, latent, kind, layer) IN (SELECT sae, latent, kind, layer FROM examples LIMIT 1);",
        "UPDATE latents SET info = '{' WHERE latent = 0;",
        "UPDATE saes SET layers = '\"012\"';",
        "UPDATE stream SET ids = x'ffffff7f' || substr(ids, 5);",
        "DELETE FROM stream;",
    ],
)
def test_a_damaged_index_is_refused_at_startup(world, tmp_path, sql) -> None:
    with pytest.raises(MlsaeError):
        IndexDB(_edited_index(world, tmp_path, sql))


def test_a_bad_latent_info_is_one_error_not_a_traceback(world, tmp_path) -> None:
    p = _edited_index(
        world, tmp_path, 'UPDATE latents SET info = \'{"logit_pos": [["a", 1]]}\' WHERE latent = 3;'
    )
    d = IndexDB(p)
    with pytest.raises(MlsaeError, match="logit_pos"):
        d.latent(0, 3)


def test_the_server_keeps_one_index_generation(world, tmp_path) -> None:
    from starlette.testclient import TestClient

    from mlsae.explore.server import create_app

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    c = TestClient(create_app(run), base_url="http://127.0.0.1")
    first = c.get("/api/latent", params={"sae": 0, "latent": 2}).text
    other = _edited_index(world, tmp_path, "UPDATE latents SET n_active = n_active + 7;")
    os.replace(other, run / "explore.sqlite")  # re-indexed under the running server
    assert c.get("/api/latent", params={"sae": 0, "latent": 2}).text == first
    (run / "explore.sqlite").unlink()
    r = c.get("/api/latent", params={"sae": 0, "latent": 2})
    assert r.status_code == 200 and r.text == first


def test_the_server_checks_host_names_and_sae_and_shows_no_paths(world, tmp_path) -> None:
    from starlette.testclient import TestClient

    from mlsae.explore.server import create_app

    app = create_app(world["run"])
    assert TestClient(app, base_url="http://evil.example").get("/api/info").status_code == 400
    info = TestClient(app, base_url="http://127.0.0.1").get("/api/info")
    assert info.status_code == 200
    assert str(world["run"].parent) not in info.text
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    w = run / "sae" / "sae.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(str(w)).items()}, str(w))
    with pytest.raises(MlsaeError, match="changed since"):
        create_app(run)


# ----------------------------------------------------------------------------- 8 / 9 / 10


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2") / "model"
    tok = make_tokenizer()
    make_model("gpt2", vocab_size=len(tok)).save_pretrained(d)  # 512 positions
    tok.save_pretrained(d)
    return d


def test_stream_resume_refuses_a_changed_corpus_or_model(gpt2_dir, tmp_path) -> None:
    from mlsae.core.config import DataConfig, ModelConfig, SaeGridConfig, SourceConfig, TrainConfig
    from mlsae.train.loop import train_command

    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n_docs=300)
    model = tmp_path / "m"
    shutil.copytree(gpt2_dir, model)
    data = DataConfig(dataset=str(corpus), context_length=32)
    kw = dict(
        inputs=Inputs(SourceConfig(tokens=1024), data, ModelConfig(model=str(model))),
        sae=SaeGridConfig(expansion_factor=[2], k=[4]),
    )
    train_command(tmp_path / "r", train=TrainConfig(batch_tokens=64, max_steps=2), **kw)
    resume = lambda: train_command(
        tmp_path / "r",
        resume=True,  # noqa: E731
        train_given={"max_steps": 3},
    )
    rows = corpus.read_text().splitlines()
    corpus.write_text("\n".join(reversed(rows)) + "\n")
    with pytest.raises(MlsaeError, match="changed since the run started"):
        resume()
    corpus.write_text("\n".join(rows) + "\n")  # back as it was: the same stream again
    w = model / "model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(str(w)).items()}, str(w), {"format": "pt"})
    with pytest.raises(MlsaeError, match="changed since the run started"):
        resume()
    shutil.copy2(gpt2_dir / "model.safetensors", w)
    resume()


def test_context_longer_than_the_positions_is_refused_before_any_folder(gpt2_dir, tmp_path):
    from mlsae.activations.extract import build_cache
    from mlsae.core.config import DataConfig, ModelConfig, SourceConfig

    corpus = write_word_corpus(tmp_path / "c.jsonl", n_docs=50)
    with pytest.raises(MlsaeError, match="512 positions"):
        build_cache(
            tmp_path / "cache",
            Inputs(
                SourceConfig(tokens=4096),
                DataConfig(dataset=str(corpus), context_length=2048),
                ModelConfig(model=str(gpt2_dir)),
            ),
        )
    assert not (tmp_path / "cache").exists()


def _broken_model(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "no tokenizer":
        for f in dst.iterdir():
            if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
                f.unlink()
    elif how == "truncated weights":
        w = dst / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "n_layer": "2"}))
    return dst


@pytest.mark.parametrize("how", ["no tokenizer", "truncated weights", "string n_layer"])
def test_broken_model_folders_are_one_error(gpt2_dir, tmp_path, how) -> None:
    from mlsae.core.config import ModelConfig
    from mlsae.data.model import load_model

    d = _broken_model(gpt2_dir, tmp_path / "m", how)
    with pytest.raises(MlsaeError):
        load_model(ModelConfig(model=str(d)))


@pytest.mark.parametrize("value", [{"a": 1}, 12345, True, [1, 2], "ok \ud800 ok"])
def test_a_text_column_that_is_not_text_is_named(tmp_path, value) -> None:
    from mlsae.core.config import DataConfig
    from mlsae.data.text import iter_documents

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(MlsaeError, match=r"d\.jsonl:2"):
        list(iter_documents(DataConfig(dataset=str(p), test_fraction=0.0)))


def test_index_checks_n_logits_and_duplicate_layers(world, tmp_path) -> None:
    from mlsae.core.config import SourceConfig
    from mlsae.core.stage_config import IndexConfig
    from mlsae.explore.index import build_index

    src = SourceConfig(cache=str(world["cache"]), tokens=96)
    with pytest.raises(MlsaeError, match="n-logits"):
        build_index(
            world["run"],
            out=tmp_path / "i.sqlite",
            inputs=Inputs.held_out(source=src),
            cfg=IndexConfig(n_logits=10**6),
        )
    run = tmp_path / "run"
    shutil.copytree(world["run"] / "sae", run / "sae")
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    (run / "sae" / "cfg.json").write_text(json.dumps({**cfg, "layers": [0, 0, 1]}))
    with pytest.raises(MlsaeError, match="twice"):
        build_index(run, out=tmp_path / "j.sqlite", inputs=Inputs.held_out(source=src))
    assert not (tmp_path / "i.sqlite").exists() and not (tmp_path / "j.sqlite").exists()


def test_index_db_module_names_its_sqlite_errors() -> None:
    e = index_db.sqlite_os_error(sqlite3.OperationalError("database or disk is full"), Path("x"))
    assert e is not None and e.errno == errno.ENOSPC
    assert index_db.sqlite_os_error(ValueError("x"), Path("x")) is None


# ----------------------------------------------------------------------------- read-back property


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _readers(world) -> dict[str, tuple[str, object]]:
    """name -> (file relative to a copy of the world, reader of the copy's root)."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.interchange.convert import read_one
    from mlsae.sae.folders import load_sae

    def index(root: Path) -> None:
        d = IndexDB(root / "run" / "explore.sqlite")
        for j in range(4):
            d.latent(0, j)
            d.examples(0, j, "top")

    return {
        "SAE cfg.json": ("run/sae/cfg.json", lambda r: load_sae(r / "run" / "sae")),
        "SAE weights": ("run/sae/sae.safetensors", lambda r: load_sae(r / "run" / "sae")),
        "cache manifest": (
            "cache/manifest.json",
            lambda r: ActivationCache(r / "cache").load_block(0),
        ),
        "explore.sqlite": ("run/explore.sqlite", index),
        "sparsify cfg.json": (
            "sp/layers.1/cfg.json",
            lambda r: read_one(r / "sp" / "layers.1", "sparsify", "m", [1]),
        ),
        "paper config.json": (
            "paper/config.json",
            lambda r: read_one(r / "paper", "mlsae-hub", "m", None),
        ),
    }


@pytest.fixture(scope="module")
def readback_root(world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readback")
    shutil.copytree(world["run"], root / "run")
    shutil.copytree(world["cache"], root / "cache")
    _sparsify(root / "sp" / "layers.1")
    _paper(root / "paper")
    return root


def _try(readers, name: str, root: Path, rel: str, data: bytes, tmp: Path) -> None:
    """Replace one file of a fresh copy by `data` and read it back: accepted, or MlsaeError."""
    work = tmp / "w"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(root, work)
    (work / rel).write_bytes(data)
    with contextlib.suppress(MlsaeError):
        readers[name][1](work)


NAMES = [
    "SAE cfg.json",
    "SAE weights",
    "cache manifest",
    "explore.sqlite",
    "sparsify cfg.json",
    "paper config.json",
]


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(data=st.binary(max_size=256))
def test_random_bytes_in_any_file_read_back(world, readback_root, tmp_path, name, data) -> None:
    readers = _readers(world)
    _try(readers, name, readback_root, readers[name][0], data, tmp_path)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "SAE weights"])
@PROPERTY
@given(
    value=JSON,
    key=st.sampled_from(
        [
            "k",
            "layers",
            "d_in",
            "shards",
            "model_name",
            "window",
            "context_length",
            "top_n",
            "standardize",
            "n_tokens",
        ]
    ),
)
def test_random_json_in_any_file_read_back(world, readback_root, tmp_path, name, value, key):
    """A random value at a random key of the file's JSON (or, for the index, of its meta table),
    and the whole file as random JSON."""
    readers = _readers(world)
    rel = readers[name][0]
    if name == "explore.sqlite":
        work = tmp_path / "w"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(readback_root, work)
        con = sqlite3.connect(work / rel)
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        con.execute("UPDATE latents SET info = ? WHERE latent = 1", (json.dumps(value),))
        con.commit()
        con.close()
        with contextlib.suppress(MlsaeError):
            readers[name][1](work)
        return
    obj = json.loads((readback_root / rel).read_text())
    for doc in ({**obj, key: value}, value):
        _try(readers, name, readback_root, rel, json.dumps(doc).encode(), tmp_path)


# ----------------------------------------------------------------------------- 11. smaller


def test_small_input_errors_are_named_on_one_line(capsys) -> None:
    from mlsae.cli.app import app
    from mlsae.cli.errors import run_app
    from mlsae.core.config import TrainConfig
    from mlsae.core.layers import iter_layers_arg

    with pytest.raises(MlsaeError, match="--seed"):
        TrainConfig(seed=2**70)
    with pytest.raises(MlsaeError, match="start at 0") as e:
        iter_layers_arg("-1", 1 << 30)
    assert "1073741823" not in str(e.value)
    rc = run_app(app, ["evaluate", "x\nmlsae: error: forged", "--cache", "nope", "--out", "e.json"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mlsae: error: ")
