"""Faults and bad input: every class of failure ends in one `mlsae: error:` line (or a clean
result), never a traceback, never a silent wrong result, and leaves what existed intact.

Classes: file-system errors (a full disk by a patched writer and by `ulimit -f` in a real
process, read-only and missing folders), JSON read back (property-based: any value in any field
of any schema is either accepted with the declared type or refused by name), non-finite values
(in caches, training and SAE files), resume identity (changed cache, concurrent writers, stale
locks, options checked before a folder exists, a damaged complete cache), outputs that would
replace inputs, memory, local text files, and the command line itself.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from mlsae.activations.cache import ActivationCache, CacheWriter
from mlsae.activations.manifest import Manifest, ShardEntry
from mlsae.cli.app import app
from mlsae.cli.errors import run_app
from mlsae.core.config import (
    DataConfig,
    MemberSpec,
    ModelConfig,
    RunConfig,
    SaeConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import read_jsonl
from mlsae.core.layers import iter_layers_arg
from mlsae.core.lock import folder_lock
from mlsae.core.outputs import check_output
from mlsae.core.schema import from_dict, hints, to_dict
from mlsae.data.text import doc_split, iter_documents, split_txt
from mlsae.lens.tuned import LensInfo
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import PerLayerListing, RunFolder, load_sae
from mlsae.train.checkpoint import CheckpointInfo, MetricsRow
from mlsae.train.loop import train_command
from mlsae.train.memory import check_training_memory, training_memory

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = [0, 1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def make_cache(path: Path, n: int = 1024, d: int = 8, seed: int = 0, nan_rows=()) -> Path:
    """A float32 cache of random vectors (2 layers, 256-token shards); every 16th token masked;
    `nan_rows`: tokens whose vectors are NaN when handed to the writer."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, len(LAYERS), d, generator=g)
    acts[list(nan_rows)] = float("nan")
    mask = torch.ones(n, dtype=torch.bool)
    mask[::16] = False
    meta = {
        "layers": LAYERS,
        "d_model": d,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "train",
        "context_length": 32,
    }
    w = CacheWriter(path, meta, shard_tokens=256, storage_dtype="float32")
    w.add(acts, torch.randint(0, 100, (n,), generator=g), mask)
    w.close()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("c") / "cache")


def files(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative names)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


TRAIN = TrainConfig(batch_tokens=64, max_steps=4, checkpoint_every=2, lr=1e-3, dead_tokens=100)


def train(out: Path, cache: Path, cfg: TrainConfig = TRAIN, r=(2,), k=(2,)) -> Path:
    return train_command(
        out,
        inputs=Inputs(source=SourceConfig(cache=cache)),
        train=cfg,
        sae=SaeGridConfig(expansion_factor=list(r), k=list(k)),
    )


def cli(capsys, *args: str | Path) -> tuple[int, list[str]]:
    """Run the CLI in this process: (exit code, non-empty stderr lines)."""
    capsys.readouterr()
    code = run_app(app, [str(a) for a in args])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def one_error_line(lines: list[str]) -> str:
    errors = [ln for ln in lines if ln.startswith("mlsae: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in ln for ln in lines)
    return errors[0]


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--bogus", "1"], "No such option: --bogus"),
        (["trian"], "No such command 'trian'"),
        (["train", "--lr", "abc", "--out", "x"], "'--lr'"),
        (["evaluate", "x"], "Missing option '--out'"),
        (["train", "--normalize", "zz", "--out", "x"], "'zz'"),
    ],
)
def test_usage_errors_are_one_line(capsys, args, says):
    code, lines = cli(capsys, *args)
    assert code == 2 and says in one_error_line(lines)


def test_error_lines_for_os_memory_and_decoding():
    from mlsae.cli.errors import error_line

    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
        "allocate memory: you tried to allocate 40960000000 bytes. Error code 12"
    )
    assert error_line(oom) == (
        "out of memory (can't allocate memory: you tried to allocate 40960000000 bytes): lower "
        "--batch-tokens, --expansion-factor or --tokens, or free memory"
    )
    assert error_line(MemoryError()).startswith("out of memory (MemoryError)")
    full = OSError(errno.ENOSPC, "No space left on device", "/d/x.json")
    assert error_line(full) == (
        "/d/x.json: No space left on device (the disk is full: free some space or write elsewhere)"
    )
    with pytest.raises(UnicodeDecodeError) as bad:
        b"caf\xe9".decode("utf-8")
    assert error_line(bad.value) == (
        "a file is not UTF-8 text (unexpected end of data at byte 3); convert it to UTF-8"
    )
    assert error_line(RuntimeError("a bug")) is None  # bugs keep their traceback


def test_reversed_layer_range_is_named():
    with pytest.raises(MlsaeError, match=r"range 5-2 is empty \(write 2-5\)"):
        iter_layers_arg("5-2", 10)
    assert iter_layers_arg("2-5", 10) == [2, 3, 4, 5]


def test_resumed_run_refuses_changed_settings(cache, tmp_path, capsys):
    """A typed option on --resume is noticed (the CLI sees which options were given)."""
    run = train(tmp_path / "r", cache)
    code, lines = cli(capsys, "train", "--resume", run, "--lr", "5")
    assert code == 2 and "--lr: a resumed run keeps its settings" in one_error_line(lines)


# ----------------------------------------------------------------------------- file system


def test_full_disk_mid_run_is_one_line_and_resumable(cache, tmp_path, monkeypatch, capsys):
    """A patched writer runs out of space at the first checkpoint: one line naming the file and
    saying the disk is full; no temporary file left; the cache intact; the run resumes."""
    import mlsae.core.io as io_mod

    before, real = files(cache), os.replace

    def replace(src, dst):
        if Path(dst).name == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    args = [
        "train",
        "--cache",
        cache,
        "--out",
        tmp_path / "r",
        "--batch-tokens",
        "64",
        "--expansion-factor",
        "2",
        "-k",
        "2",
        "--max-steps",
        "4",
        "--checkpoint-every",
        "2",
    ]
    code, lines = cli(capsys, *args)
    line = one_error_line(lines)
    assert code == 2 and "state.pt: No space left on device (the disk is full" in line
    assert str(tmp_path / "r" / "checkpoint") in line
    assert not [p for p in (tmp_path / "r").rglob("*") if ".tmp" in p.name or ".old" in p.name]
    assert files(cache) == before
    monkeypatch.setattr(io_mod.os, "replace", real)
    assert cli(capsys, "train", "--resume", tmp_path / "r")[0] == 0


def test_file_size_limit_in_a_real_process(cache, tmp_path):
    """`ulimit -f` (EFBIG, what a real full quota looks like) in a subprocess: one line, exit 2,
    naming the file; then the same run resumes without the limit."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [
        sys.executable,
        "-m",
        "mlsae",
        "train",
        "--cache",
        str(cache),
        "--out",
        str(tmp_path / "r"),
        "--batch-tokens",
        "64",
        "--expansion-factor",
        "64",
        "-k",
        "2",
        "--max-steps",
        "2",
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    line = one_error_line(lines)
    assert r.returncode == 2 and "checkpoint/state.pt: File too large" in line, r.stderr
    train_command(tmp_path / "r", resume=True)
    assert load_sae(tmp_path / "r" / "sae").cfg.expansion_factor == 64


def test_unwritable_or_full_output_is_refused_before_work(tmp_path, monkeypatch):
    import mlsae.core.outputs as out_mod

    ok = check_output(tmp_path / "new" / "sub" / "e.json", "eval", file=True)
    assert not (tmp_path / "new").exists()  # checked, not created
    assert ok == tmp_path / "new" / "sub" / "e.json"

    def read_only(**kw):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(out_mod.tempfile, "mkstemp", lambda **kw: read_only(**kw))
        with pytest.raises(MlsaeError, match=r"cannot write there .*Read-only file system"):
            check_output(tmp_path / "a", "analysis")
    with monkeypatch.context() as m:
        m.setattr(out_mod.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=4096))
        with pytest.raises(MlsaeError, match=r"has 4.0 KB free, this needs about 1.0 MB"):
            check_output(tmp_path / "a", "analysis")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MlsaeError, match="is a file, not a folder"):
        check_output(tmp_path / "afile" / "e.json", "eval", file=True)
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(MlsaeError, match="Permission denied"):
            check_output(ro / "c", "cache")


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MlsaeError, match=r"bad.jsonl:2: not UTF-8 text"):
        list(iter_documents(DataConfig(dataset=str(bad), test_fraction=0.0)))


# ----------------------------------------------------------------------------- outputs


KIND_FILES = {
    "cache": ["manifest.json"],
    "run": ["train_cfg.json"],
    "sae": ["cfg.json", "sae.safetensors"],
    "lens": ["lens.json"],
    "analysis": ["analysis.json"],
    "evolution": ["evolution.json"],
}


@pytest.mark.parametrize("writer", ["cache", "run", "analysis", "evolution", "lens", "cross"])
def test_an_output_never_replaces_another_kind(tmp_path, writer):
    for kind, names in KIND_FILES.items():
        folder = tmp_path / kind
        folder.mkdir()
        for n in names:
            (folder / n).write_text("{}")
    before = files(tmp_path)
    for kind in KIND_FILES:
        if kind == writer:
            check_output(tmp_path / kind, writer)  # the same kind: the command decides
        else:
            with pytest.raises(MlsaeError, match="choose a new --out"):
                check_output(tmp_path / kind, writer)
    with pytest.raises(MlsaeError, match="also an input"):
        check_output(tmp_path / "x", writer, inputs=[tmp_path / "x"])
    assert files(tmp_path) == before


def test_file_outputs_never_replace_inputs(tmp_path, cache):
    run = tmp_path / "run"
    (run / "sae").mkdir(parents=True)
    for p in ("train_cfg.json", "sae/cfg.json", "sae/sae.safetensors"):
        (run / p).write_text("{}")
    refused = {
        cache / "manifest.json": "inside an activation cache",
        cache / "new.json": "inside an activation cache",
        run / "train_cfg.json": "is a file of a training run",
        run / "sae" / "cfg.json": "is a file of an SAE folder",
        run: "also an input",
        tmp_path: "is a folder",
    }
    for out, says in refused.items():
        with pytest.raises(MlsaeError, match=says):
            check_output(out, "eval", file=True, inputs=[run])
    check_output(run / "eval.json", "eval", file=True, inputs=[run])  # README usage
    check_output(run / "sae" / "eval.json", "eval", file=True, inputs=[run])


def test_evaluate_cli_refuses_a_cache_manifest(cache, tmp_path, capsys):
    before = files(cache)
    sae = SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=2, k=2, layers=LAYERS))
    sae.save(tmp_path / "sae")
    code, lines = cli(
        capsys,
        "evaluate",
        tmp_path / "sae",
        "--cache",
        cache,
        "--allow-train",
        "--no-ce",
        "--out",
        cache / "manifest.json",
    )
    assert code == 2 and "inside an activation cache" in one_error_line(lines)
    assert files(cache) == before


# ----------------------------------------------------------------------------- JSON schemas


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)

SHA = "ab" * 32
VALID: dict[type, dict[str, Any]] = {
    SaeConfig: SaeConfig(d_in=8, expansion_factor=2, k=3, layers=[0, 2]).to_dict(),
    ShardEntry: {"name": "shard_00000.safetensors", "sha256": SHA, "n_tokens": 10, "n_used": 9},
    Manifest: {
        "layers": [0, 3],
        "d_model": 8,
        "dtype": "float32",
        "n_tokens": 10,
        "complete": True,
        "model": "m",
        "context_length": 5,
        "shards": [{"name": "shard_00000.safetensors", "sha256": SHA, "n_tokens": 10}],
    },
    LensInfo: {
        "format": "mlsae-tuned-lens",
        "n_layers": 3,
        "d_model": 8,
        "layers": [0, 1],
        "model": "m",
        "max_cond": 1e6,
    },
    PerLayerListing: {
        "layers": [0, 1],
        "saes": [{"layer": 0, "path": "layer_00"}, {"layer": 1, "path": "layer_01"}],
    },
    CheckpointInfo: {"step": 4, "epoch": 0, "batch": 4},
    MetricsRow: {"step": 3, "epoch": 0, "sae": "sae", "loss": 0.5},
    TrainConfig: to_dict(TrainConfig()),
    DataConfig: to_dict(DataConfig(dataset="x.txt")),
    RunConfig: to_dict(
        RunConfig(
            data=DataConfig(),
            model=ModelConfig(),
            source=SourceConfig(),
            sae=SaeGridConfig(),
            train=TrainConfig(),
            cache="/c",
            mode="mlsae",
            layers=[0, 1],
            d_in=8,
            members=[MemberSpec("sae", 8, 32, [0, 1], 0)],
            fingerprint="f",
        )
    ),
}


def has_type(value: Any, tp: Any) -> bool:
    """Whether a value read back has the declared type (written from the annotation, not from
    the schema code)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(has_type(value, a) for a in get_args(tp))
    if origin is Literal:
        return value in get_args(tp) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return isinstance(value, origin) and all(has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp) and all(
            has_type(getattr(value, f.name), hints(tp)[f.name])
            for f in dataclasses.fields(tp)
            if f.init
        )
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, float) and math.isfinite(value)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON object (dict keys and list indices)."""
    out = []
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(list(VALID)), data=st.data(), value=json_values, drop=st.booleans())
def test_schema_accepts_typed_values_or_refuses_by_name(cls, data, value, drop):
    """One field of a valid file replaced by any JSON value (or dropped): the schema check either
    refuses it with an MlsaeError naming the file, or returns an object whose every field has
    its declared type; it never raises anything else."""
    obj = json.loads(json.dumps(VALID[cls]))
    path = data.draw(st.sampled_from(_paths(obj)))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        got = from_dict(cls, obj, "f.json")
    except MlsaeError as e:
        assert str(e).startswith("f.json")
        return
    assert has_type(got, cls)


@settings(max_examples=150, deadline=None)
@given(cls=st.sampled_from(list(VALID)), value=json_values)
def test_schema_on_any_json_raises_only_mlsae_errors(cls, value):
    try:
        got = from_dict(cls, value, "f.json")
    except MlsaeError:
        return
    assert has_type(got, cls)


@pytest.mark.parametrize("cls", list(VALID))
def test_schema_round_trip(cls):
    obj = from_dict(cls, VALID[cls], "f.json")
    assert from_dict(cls, json.loads(json.dumps(to_dict(obj))), "f.json") == obj


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> tuple[Path, list]:
    path = make_cache(tmp_path_factory.mktemp("s") / "c", n=512)
    c = ActivationCache(path)
    return path, [c.load_block(i) for i in range(c.n_blocks)]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), value=json_values | st.integers(0, 600))
def test_an_edited_manifest_is_refused_or_reads_the_same_vectors(small_cache, data, value):
    """Any field of a real cache's manifest replaced: opening and reading every shard either
    fails with an MlsaeError, or yields exactly the original vectors, ids and masks (and the
    same count of usable vectors): never other tokens."""
    path, blocks = small_cache
    man = path / "manifest.json"
    original = man.read_text()
    obj = json.loads(original)
    key = data.draw(st.sampled_from(_paths(obj)))
    parent = obj
    for k in key[:-1]:
        parent = parent[k]
    parent[key[-1]] = value
    try:
        man.write_text(json.dumps(obj))
        c = ActivationCache(path)
        got = [c.load_block(i) for i in range(c.n_blocks)]
        n_vec = c.n_vectors()
    except MlsaeError:
        return
    finally:
        man.write_text(original)
    assert len(got) == len(blocks) and n_vec == sum(int(b.mask.sum()) for b in blocks) * 2
    for a, b in zip(got, blocks, strict=True):
        assert torch.equal(a.activations, b.activations) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.token_ids, b.token_ids) and a.offset == b.offset


def test_jsonl_torn_last_line_dropped_bad_middle_line_named(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(MlsaeError, match=r"m.jsonl:2: not a JSON line"):
        read_jsonl(p)


def test_resume_after_a_torn_metrics_line(cache, tmp_path):
    run = train(tmp_path / "r", cache)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "los')
    train_command(run, resume=True, train_given={"max_steps": 8})
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_failed_resume_changes_nothing(cache, tmp_path):
    """A resume refused (broken checkpoint) leaves train_cfg.json as it was, though it was
    given a new --max-steps; an evaluation file of odd types is ignored, not trusted."""
    run = train(tmp_path / "r", cache)
    state = run / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    before = files(run)
    with pytest.raises(MlsaeError, match="unreadable checkpoint|corrupt checkpoint"):
        train_command(run, resume=True, train_given={"max_steps": 9})
    assert {k: v for k, v in files(run).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
    (run / "eval.json").write_text('{"per_layer": 1, "mean": "x"}')
    assert RunFolder(run).find_eval() is None


def test_wrong_types_in_files_are_named(cache, tmp_path):
    run = train(tmp_path / "r", cache)
    cfg = run / "sae" / "cfg.json"
    good = cfg.read_text()
    for text, says in [
        ("[1, 2]", "expected a JSON object"),
        (good.replace('"k": 2', '"k": "2"'), "k: expected an integer, got '2'"),
    ]:
        cfg.write_text(text)
        with pytest.raises(MlsaeError, match=says):
            load_sae(run / "sae")
    cfg.write_text(good)
    (run / "train_cfg.json").write_text("{}")
    with pytest.raises(MlsaeError, match="train_cfg.json: missing field 'data'"):
        train_command(run, resume=True)


# ----------------------------------------------------------------------------- non-finite


def test_writer_masks_and_counts_nonfinite_vectors(tmp_path):
    path = make_cache(tmp_path / "c", n=512, nan_rows=[3, 300, 301])
    m = json.loads((path / "manifest.json").read_text())
    assert m["n_nonfinite"] == 3
    assert [s.get("n_nonfinite", 0) for s in m["shards"]] == [1, 2]
    c = ActivationCache(path)
    b0, b1 = c.load_block(0), c.load_block(1)
    assert not b0.mask[3] and not b1.mask[300 - 256] and not b1.mask[301 - 256]
    assert torch.isfinite(b0.activations).all() and torch.isfinite(b1.activations).all()
    out = train(tmp_path / "r", path)
    sae = load_sae(out / "sae")
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_nonfinite_vectors_in_a_cache_are_refused(tmp_path):
    """NaN vectors written behind the writer's back, with the sha256 updated to match."""
    path = make_cache(tmp_path / "c", n=512)
    m = json.loads((path / "manifest.json").read_text())
    t = dict(load_file(str(path / "shard_00001.safetensors")))
    t["activations"][5] = float("nan")
    data = save(t)
    (path / "shard_00001.safetensors").write_bytes(data)
    m["shards"][1]["sha256"] = hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MlsaeError, match="shard_00001.safetensors .* 1 used token.* NaN or inf"):
        ActivationCache(path).load_block(1)
    with pytest.raises(MlsaeError, match="NaN or inf"):
        train(tmp_path / "r", path)


def test_divergence_stops_at_the_first_nonfinite_step(cache, tmp_path):
    cfg = dataclasses.replace(TRAIN, lr=1e30, checkpoint_every=1, max_steps=20)
    with pytest.raises(MlsaeError, match=r"training diverged at step (\d+): the (loss|weights)"):
        train(tmp_path / "r", cache, cfg)
    sae = load_sae(tmp_path / "r" / "sae")  # the last checkpoint's SAE: finite, or refused
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t: {**t, "W_dec": t["W_dec"] * float("nan")}, "W_dec holds NaN or inf"),
        (lambda t: {k: v.long() for k, v in t.items()}, "dtype int64, not a floating-point"),
    ],
)
def test_load_sae_checks_dtype_and_finiteness(tmp_path, edit, says):
    SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=2, k=2, layers=[0])).save(tmp_path / "s")
    w = tmp_path / "s" / "sae.safetensors"
    save_file(edit(dict(load_file(str(w)))), str(w))
    with pytest.raises(MlsaeError, match=says):
        load_sae(tmp_path / "s")


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"eps": -1.0},
        {"aux_coef": float("nan")},
        {"betas": (float("nan"), 0.9)},
    ],
)
def test_nonfinite_options_are_refused(bad):
    with pytest.raises(MlsaeError):
        TrainConfig(**bad)


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_a_cache_rebuilt_at_the_same_path(tmp_path):
    cache = make_cache(tmp_path / "c")
    run = train(tmp_path / "r", cache)
    shutil.rmtree(cache)
    make_cache(cache, seed=1)  # same shape, other vectors
    with pytest.raises(MlsaeError, match="not the data this run started on"):
        train_command(run, resume=True, train_given={"max_steps": 8})


def test_one_writer_per_run_and_stale_locks_do_not_block(cache, tmp_path):
    run = train(tmp_path / "r", cache)
    with (
        folder_lock(run, "training run"),
        pytest.raises(
            MlsaeError,
            match=rf"in use by another "
            rf"mlsae process \(pid {os.getpid()}",
        ),
    ):
        train_command(run, resume=True, train_given={"max_steps": 6})
    # a process holding the lock is killed: its lock goes with it
    code = (
        f"import time; from mlsae.core.lock import folder_lock\n"
        f"with folder_lock({str(run)!r}):\n print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(MlsaeError, match=rf"pid {holder.pid}"):
            train_command(run, resume=True, train_given={"max_steps": 6})
    finally:
        holder.kill()
        holder.wait()
    train_command(run, resume=True, train_given={"max_steps": 6})
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("arch", ["gpt2"])
def test_options_and_memory_are_checked_before_the_run_folder(tiny_model_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps." for i in range(200)))
    kw = dict(
        inputs=Inputs(
            SourceConfig(tokens=512),
            DataConfig(dataset=str(text), context_length=32),
            ModelConfig(model=str(tiny_model_dir)),
        ),
        train=TRAIN,
    )
    with pytest.raises(MlsaeError, match="-k 999 must be between 1 and d_sae"):
        train_command(tmp_path / "r", sae=SaeGridConfig(expansion_factor=[2], k=[999]), **kw)
    with pytest.raises(MlsaeError, match=r"need about \d+\.\d GB of memory"):
        train_command(tmp_path / "r", sae=SaeGridConfig(expansion_factor=[10**8], k=[2]), **kw)
    assert not (tmp_path / "r").exists()
    out = train_command(tmp_path / "r", sae=SaeGridConfig(expansion_factor=[2], k=[2]), **kw)
    assert load_sae(out / "sae").cfg.k == 2


def test_memory_estimate_counts_the_real_parameters(cache, monkeypatch):
    import mlsae.core.memory as mem

    src = ActivationCache(cache)
    run = RunConfig(
        data=DataConfig(),
        model=ModelConfig(),
        source=SourceConfig(),
        sae=SaeGridConfig(),
        train=TRAIN,
        cache=str(cache),
        mode="mlsae",
        layers=LAYERS,
        d_in=8,
        members=[MemberSpec("a", 2, 2, LAYERS, 0), MemberSpec("b", 4, 2, LAYERS, 0)],
    )
    n = sum(
        p.numel()
        for r in (2, 4)
        for p in SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=r, k=2)).parameters()
    )
    est = training_memory(run, src)
    assert est["state"] == n * 4 * 5  # weights, gradients, 2 Adam moments, checkpoint copy
    assert est["step"] >= TRAIN.batch_tokens * 32 * 4  # one [B, d_sae] fp32 tensor at least
    need = sum(est.values())
    monkeypatch.setattr(mem, "available_bytes", lambda: need - 1)
    with pytest.raises(MlsaeError, match="lower --expansion-factor or --batch-tokens"):
        check_training_memory(run, src)
    monkeypatch.setattr(mem, "available_bytes", lambda: need)
    check_training_memory(run, src)


@pytest.mark.parametrize("arch", ["gpt2"])
def test_a_damaged_complete_cache_is_repaired_and_ctrl_c_is_one_line(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """SIGINT in the middle of `mlsae cache`: one line, exit 130, shards kept; the same command
    finishes it; a shard damaged after completion is rewritten by the same command again, to
    the same bytes."""
    from mlsae.activations.live import LiveSource

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: river stone cloud seven." for i in range(300)))
    args = [
        "cache",
        "--model",
        tiny_model_dir,
        "--dataset",
        corpus,
        "--tokens",
        "1024",
        "--context-length",
        "32",
        "--shard-tokens",
        "256",
        "--out",
        tmp_path / "c",
    ]
    real, calls = LiveSource.load_block, []

    def interrupted(self, i):
        calls.append(i)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
        return real(self, i)

    monkeypatch.setattr(LiveSource, "load_block", interrupted)
    code, lines = cli(capsys, *args)
    assert code == 130 and lines[-1].startswith("mlsae: stopped by signal 2: 512 tokens")
    assert "run the same command again" in lines[-1]
    monkeypatch.setattr(LiveSource, "load_block", real)
    assert cli(capsys, *args)[0] == 0
    good = files(tmp_path / "c")
    shard = tmp_path / "c" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    assert cli(capsys, *args)[0] == 0
    assert files(tmp_path / "c") == good


# ----------------------------------------------------------------------------- local text


def test_txt_documents_by_paragraph_line_or_file(tmp_path):
    text = "a b\nc\n\n\nd e\n  \nf\n"
    assert split_txt(text, "paragraph") == ["a b\nc", "d e", "f"]
    assert split_txt(text, "line") == ["a b", "c", "d e", "f"]
    assert split_txt(text, "file") == [text]
    paras = [f"paragraph {i} about rivers and stones." for i in range(400)]
    (tmp_path / "c.txt").write_text("\n\n".join(paras))
    cfg = DataConfig(dataset=str(tmp_path / "c.txt"))
    train_docs = list(iter_documents(cfg))
    test_docs = list(iter_documents(dataclasses.replace(cfg, split="test")))
    want_test = [p for p in paras if doc_split(p, 0.1) == "test"]
    assert test_docs == want_test and 10 < len(test_docs) < 80
    assert len(train_docs) + len(test_docs) == 400 and not set(train_docs) & set(test_docs)
    one = "only one paragraph " * 30
    (tmp_path / "one.txt").write_text(one)
    empty_side = "train" if doc_split(one.strip("\n"), 0.1) == "test" else "test"
    with pytest.raises(MlsaeError, match=f"1 document.*none in split '{empty_side}'"):
        list(iter_documents(DataConfig(dataset=str(tmp_path / "one.txt"), split=empty_side)))


def test_txt_documents_is_an_option(capsys):
    code, lines = cli(capsys, "cache", "--txt-documents", "pages", "--out", "x")
    assert code == 2 and "--txt-documents" in one_error_line(lines)
