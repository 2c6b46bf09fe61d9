"""Fault probes: bad input, broken files and hostile conditions, tried as a user would.

Each probe runs `python -m mlsae ...` in a subprocess on a tiny random model (the tests'
byte-level GPT-2) and small caches, and records its exit code, whether stderr ends in exactly
one `mlsae: error: ...` line with no traceback (or the command succeeded, when that is what a
user should get), and whether files that existed before were left intact. Prints one line per
probe and the pass/fail counts per class.

    PYTHONPATH=src python scripts/probe_faults.py [-j 2] [-k PATTERN] [--keep DIR]

Read-only folders and a full disk are real small tmpfs mounts when this runs as root with mount
rights; otherwise a chmod'ed folder (not effective for root) and RLIMIT_FSIZE (EFBIG).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = os.environ.get("PROBE_SRC", str(ROOT / "src"))  # another checkout's src/ to compare
ENV = {
    **os.environ,
    "PYTHONPATH": SRC,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}
TIMEOUT = 300


def mlsae(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "mlsae", *map(str, args)]


def tree_hash(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the paths (files or folders)."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            if f.name != ".lock":  # a lock file's content is its last holder's pid
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@dataclass
class Probe:
    name: str
    cls: str
    cmd: Callable[[Path], list[str]]  # workdir -> argv
    expect: str  # "error": one `mlsae: error:` line; "ok": exit 0; "clean": either; "interrupt"
    setup: Callable[[Path], None] | None = None
    intact: Callable[[Path], list[Path]] | None = None  # default for errors: the whole workdir
    check: Callable[[Path], str | None] | None = None  # extra condition: None = fine, else why
    match: str | None = None  # regex the error line must match
    run: Callable[[Path, list[str]], tuple[int, str]] | None = None  # custom execution
    limit_fsize: int | None = None  # RLIMIT_FSIZE bytes (full disk without a tmpfs)


@dataclass
class Result:
    probe: Probe
    ok: bool
    rc: int
    why: str
    last: str
    seconds: float = 0.0


@dataclass
class Env:
    base: Path
    model: Path = field(init=False)
    ro: Path | None = None  # read-only folder
    full: Path | None = None  # full disk folder
    mounts: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model = self.base / "model"


E: Env  # set in main


# ----------------------------------------------------------------------------- fixtures


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    if r.returncode != 0:
        raise SystemExit(f"setup failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def build_fixtures(base: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer, write_word_corpus  # type: ignore

    tok = make_tokenizer()
    make_model("gpt2", vocab_size=len(tok)).save_pretrained(base / "model")
    tok.save_pretrained(base / "model")
    write_word_corpus(base / "corpus.jsonl", n_docs=1500)
    g = __import__("numpy").random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven"]
    paras = [" ".join(g.choice(words, size=12)) + "." for _ in range(400)]
    (base / "corpus.txt").write_text("\n\n".join(paras) + "\n")
    m, c = base / "model", base / "corpus.jsonl"
    common = ["--model", m, "--dataset", c, "--context-length", "64"]
    sh(
        mlsae(
            "cache",
            *common,
            "--tokens",
            "4096",
            "--shard-tokens",
            "1024",
            "--storage-dtype",
            "float32",
            "--out",
            base / "cache",
        )
    )
    sh(
        mlsae(
            "cache",
            *common,
            "--split",
            "test",
            "--tokens",
            "1024",
            "--shard-tokens",
            "512",
            "--storage-dtype",
            "float32",
            "--out",
            base / "cache_test",
        )
    )
    train = [
        "--expansion-factor",
        "2",
        "-k",
        "4",
        "--batch-tokens",
        "128",
        "--checkpoint-every",
        "3",
        "--lr",
        "1e-3",
    ]
    sh(mlsae("train", "--cache", base / "cache", *train, "--max-steps", "6", "--out", base / "run"))
    sh(
        mlsae(
            "train",
            "--cache",
            base / "cache",
            *train,
            "--max-steps",
            "6",
            "--per-layer",
            "--out",
            base / "per_layer",
        )
    )
    sh(
        mlsae(
            "lens",
            "train",
            "--model",
            m,
            "--dataset",
            c,
            "--context-length",
            "64",
            "--tokens",
            "512",
            "--steps",
            "1",
            "--out",
            base / "lens",
        )
    )
    sh(mlsae("analyze", base / "run", "--cache", base / "cache_test", "--out", base / "analysis"))
    sh(mlsae("index", base / "run", "--cache", base / "cache_test"))  # RUN/explore.sqlite


def setup_mounts(env: Env) -> None:
    """A read-only folder and a nearly full disk: tmpfs mounts if allowed, else fallbacks."""
    ro, full = env.base / "ro", env.base / "full"
    for d in (ro, full):
        subprocess.run(["umount", str(d)], capture_output=True)  # left by a killed run
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    if os.geteuid() == 0 and shutil.which("mount"):
        a = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
        )
        b = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(full)], capture_output=True
        )
        if a.returncode == 0:
            env.mounts.append(ro)
            env.ro = ro
        if b.returncode == 0:
            env.mounts.append(full)
            env.full = full
    if env.ro is None:
        ro.chmod(0o555)
        env.ro = ro
    if env.full is None:
        env.full = full


def teardown(env: Env) -> None:
    for m in env.mounts:
        subprocess.run(["umount", str(m)], capture_output=True)
    if env.ro is not None and env.ro.exists():
        with contextlib.suppress(OSError):
            env.ro.chmod(0o755)


def copy(name: str, w: Path, as_: str | None = None) -> Path:
    src = E.base / name
    dst = w / (as_ or name)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


# ----------------------------------------------------------------------------- helpers


def edit_json(path: Path, fn: Callable[[object], object]) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def set_key(path: Path, key: str, value: object) -> None:
    def f(d):
        d[key] = value
        return d

    edit_json(path, f)


def sae_finite(folder: Path) -> str | None:
    import torch
    from safetensors.torch import load_file

    if not (folder / "sae.safetensors").exists():
        return None
    t = load_file(str(folder / "sae.safetensors"))
    bad = [k for k, v in t.items() if not torch.isfinite(v).all()]
    return f"non-finite SAE weights saved: {bad}" if bad else None


def exists(rel: str) -> Callable[[Path], str | None]:
    return lambda w: None if (w / rel).exists() else f"{rel} was not written"


def absent(rel: str) -> Callable[[Path], str | None]:
    return lambda w: f"{rel} was created" if (w / rel).exists() else None


def rewrite_shard(cache: Path, i: int, fn: Callable[[dict], dict]) -> None:
    """Rewrite shard i's tensors with fn and fix its sha256 in the manifest (a consistent edit)."""
    from safetensors.torch import load_file, save

    m = json.loads((cache / "manifest.json").read_text())
    entry = m["shards"][i]
    data = save(fn(dict(load_file(str(cache / entry["name"])))))
    (cache / entry["name"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(m))


def nan_rows(t: dict) -> dict:
    a = t["activations"].clone()
    a[5:9] = float("nan")
    return {**t, "activations": a}


TRAIN = ["--expansion-factor", "2", "-k", "4", "--batch-tokens", "128", "--lr", "1e-3"]


def fill_disk(w: Path) -> None:
    """Fill the full-disk folder up to a few KB."""
    assert E.full is not None
    if E.full in E.mounts:
        with contextlib.suppress(OSError), open(E.full / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()


# ----------------------------------------------------------------------------- custom runners


def run_sigint_cache(w: Path, cmd: list[str]) -> tuple[int, str]:
    """SIGINT a cache build once its first shard exists; then the same command must resume."""
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    man = w / "c" / "manifest.json"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and p.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(man.read_text())["shards"]:
                break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=TIMEOUT)[1]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        return 99, err + "\nresume failed:\n" + r.stderr
    return p.returncode, err


def run_two_resumes(w: Path, cmd: list[str]) -> tuple[int, str]:
    """Start a long resume, then a second resume of the same run: the second must be refused."""
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = w / "run" / "checkpoint" / "checkpoint.json"
    start = json.loads(ck.read_text())["step"]
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and first.poll() is None:  # the first one is training
        with contextlib.suppress(OSError, ValueError):
            if json.loads(ck.read_text())["step"] > start:
                break
        time.sleep(0.05)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=TIMEOUT)
    lines = (w / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in lines]
    if steps != sorted(steps):
        return 98, r.stderr + "\nmetrics.jsonl interleaved"
    return r.returncode, r.stderr


def run_kill9_resume(w: Path, cmd: list[str]) -> tuple[int, str]:
    """kill -9 a training run after a checkpoint, then resume it (a stale lock must not block)."""
    first = subprocess.Popen(
        cmd[:-2] + ["--out", str(w / "r")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ck = w / "r" / "checkpoint" / "checkpoint.json"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and first.poll() is None and not ck.exists():
        time.sleep(0.05)
    first.kill()
    first.wait()
    r = subprocess.run(
        mlsae("train", "--resume", w / "r", "--max-steps", "12"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return r.returncode, r.stderr


def run_rebuilt_cache(w: Path, cmd: list[str]) -> tuple[int, str]:
    """Train, rebuild its cache at the same path from other data, resume."""
    sh(mlsae("train", "--cache", w / "cache", *TRAIN, "--max-steps", "3", "--out", w / "r"))
    shutil.rmtree(w / "cache")
    sh(
        mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.txt",
            "--context-length",
            "64",
            "--tokens",
            "4096",
            "--shard-tokens",
            "1024",
            "--storage-dtype",
            "float32",
            "--out",
            w / "cache",
        )
    )
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, r.stderr


def run_rejected_then_reused(w: Path, cmd: list[str]) -> tuple[int, str]:
    """A run refused for a bad option, then the corrected command on the same --out."""
    bad = [*cmd, "-k", "999"]
    subprocess.run(bad, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    r = subprocess.run([*cmd, "-k", "4"], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, r.stderr


# ----------------------------------------------------------------------------- the probes


def probes() -> list[Probe]:
    P = []  # noqa: N806
    add = lambda *a, **k: P.append(Probe(*a, **k))  # noqa: E731
    tc = lambda w: ["--cache", w / "cache_test"]  # noqa: E731
    ro = lambda: E.ro  # noqa: E731

    # --- file-system errors
    add(
        "evaluate --out new/sub/e.json",
        "fs",
        lambda w: mlsae("evaluate", w / "run", *tc(w), "--out", w / "new/sub/e.json"),
        "ok",
        lambda w: (copy("run", w), copy("cache_test", w)) and None,
        check=exists("new/sub/e.json"),
    )
    add(
        "evaluate --out read-only/e.json",
        "fs",
        lambda w: mlsae(
            "evaluate", E.base / "run", "--cache", E.base / "cache_test", "--out", ro() / "e.json"
        ),
        "error",
    )
    add(
        "evaluate --out read-only/sub/e.json",
        "fs",
        lambda w: mlsae(
            "evaluate",
            E.base / "run",
            "--cache",
            E.base / "cache_test",
            "--out",
            ro() / "sub" / "e.json",
        ),
        "error",
    )
    add(
        "cache --out read-only/c",
        "fs",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "256",
            "--context-length",
            "64",
            "--out",
            ro() / "c",
        ),
        "error",
    )
    add(
        "train --out read-only/r",
        "fs",
        lambda w: mlsae(
            "train", "--cache", E.base / "cache", *TRAIN, "--max-steps", "2", "--out", ro() / "r"
        ),
        "error",
    )
    add(
        "analyze --out read-only/a",
        "fs",
        lambda w: mlsae(
            "analyze", E.base / "run", "--cache", E.base / "cache_test", "--out", ro() / "a"
        ),
        "error",
    )
    add(
        "evolution --out read-only/ev",
        "fs",
        lambda w: mlsae(
            "evolution",
            E.base / "per_layer",
            "--cache",
            E.base / "cache_test",
            "--out",
            ro() / "ev",
        ),
        "error",
    )
    add(
        "lens train --out read-only/l",
        "fs",
        lambda w: mlsae(
            "lens",
            "train",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--context-length",
            "64",
            "--tokens",
            "256",
            "--steps",
            "1",
            "--out",
            ro() / "l",
        ),
        "error",
    )
    add(
        "evaluate --out under a regular file",
        "fs",
        lambda w: mlsae(
            "evaluate",
            E.base / "run",
            "--cache",
            E.base / "cache_test",
            "--out",
            w / "afile" / "e.json",
        ),
        "error",
        lambda w: (w / "afile").write_text("x"),
    )
    add(
        "cache --out on a full disk",
        "fs",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "4096",
            "--context-length",
            "64",
            "--storage-dtype",
            "float32",
            "--out",
            (E.full or w) / "c",
        ),
        "error",
        fill_disk,
        limit_fsize=64_000,
        intact=lambda w: [],
    )
    add(
        "train --out on a full disk",
        "fs",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            *TRAIN,
            "--max-steps",
            "4",
            "--out",
            (E.full or w) / "r",
        ),
        "error",
        fill_disk,
        limit_fsize=8_000,
        intact=lambda w: [E.base / "cache"],
    )
    add(
        "evaluate --out on a full disk",
        "fs",
        lambda w: mlsae(
            "evaluate",
            E.base / "run",
            "--cache",
            E.base / "cache_test",
            "--out",
            (E.full or w) / "e.json",
        ),
        "error",
        fill_disk,
        limit_fsize=1_000,
        intact=lambda w: [E.base / "run"],
    )
    add(
        "cache --dataset non-UTF-8 .jsonl",
        "fs",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            w / "bad.jsonl",
            "--tokens",
            "256",
            "--context-length",
            "64",
            "--out",
            w / "c",
        ),
        "error",
        lambda w: (w / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9 \xff"}\n'),
        check=absent("c"),
    )
    add(
        "cache --dataset non-UTF-8 .txt",
        "fs",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            w / "bad.txt",
            "--tokens",
            "256",
            "--context-length",
            "64",
            "--out",
            w / "c",
        ),
        "clean",
        lambda w: (w / "bad.txt").write_bytes(b"caf\xe9 \xff " * 400 + b"\n\n" + b"ok " * 400),
    )
    add(
        "train --out a path whose parent is a file",
        "fs",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            *TRAIN,
            "--max-steps",
            "2",
            "--out",
            w / "afile" / "r",
        ),
        "error",
        lambda w: (w / "afile").write_text("x"),
    )

    # --- JSON read back without type checks
    def cache_edit(fn):
        def setup(w: Path) -> None:
            copy("cache", w)
            fn(w / "cache" / "manifest.json")

        return setup

    train_cache = lambda w: mlsae(
        "train",
        "--cache",
        w / "cache",
        *TRAIN,
        "--max-steps",
        "2",  # noqa: E731
        "--out",
        w / "r",
    )
    for what, fn in [
        ("d_model is a string", lambda p: set_key(p, "d_model", "32")),
        ("layers is a string", lambda p: set_key(p, "layers", "0,1,2")),
        (
            "a shard entry is a list",
            lambda p: edit_json(p, lambda d: {**d, "shards": [[1]] + d["shards"][1:]}),
        ),
        ("the manifest is a list", lambda p: p.write_text("[]")),
        ("complete is 'yes'", lambda p: set_key(p, "complete", "yes")),
        ("n_tokens is 1e3", lambda p: set_key(p, "n_tokens", 1e3)),
        (
            "shard name escapes the folder",
            lambda p: edit_json(
                p,
                lambda d: {
                    **d,
                    "shards": [{**d["shards"][0], "name": "../run/train_cfg.json"}]
                    + d["shards"][1:],
                },
            ),
        ),
        ("not UTF-8", lambda p: p.write_bytes(b"\xff\xfe{")),
    ]:
        add(
            f"train on a manifest whose {what}",
            "json",
            train_cache,
            "error",
            cache_edit(fn),
            check=absent("r"),
        )
    add(
        "train on a manifest with an edited n_used",
        "json",
        train_cache,
        "error",
        cache_edit(
            lambda p: edit_json(
                p,
                lambda d: {**d, "shards": [{**s, "n_used": s["n_used"] // 2} for s in d["shards"]]},
            )
        ),
        check=absent("r/sae"),
    )
    add(
        "train on a manifest with edited token counts",
        "json",
        train_cache,
        "error",
        cache_edit(
            lambda p: edit_json(
                p,
                lambda d: {
                    **d,
                    "n_tokens": d["n_tokens"] - 64,
                    "shards": [{**d["shards"][0], "n_tokens": d["shards"][0]["n_tokens"] - 64}]
                    + d["shards"][1:],
                },
            )
        ),
        check=absent("r/sae"),
    )

    def sae_edit(fn):
        def setup(w: Path) -> None:
            copy("run", w)
            fn(w / "run" / "sae")

        return setup

    eval_run = lambda w: mlsae(
        "evaluate",
        w / "run",
        "--cache",
        E.base / "cache_test",  # noqa: E731
        "--out",
        w / "e.json",
    )
    for what, fn in [
        ("cfg.json is a list", lambda d: (d / "cfg.json").write_text("[1, 2]")),
        ("cfg.json has k '4'", lambda d: set_key(d / "cfg.json", "k", "4")),
        ("cfg.json has k 4.5", lambda d: set_key(d / "cfg.json", "k", 4.5)),
        (
            "cfg.json lacks d_in",
            lambda d: edit_json(
                d / "cfg.json", lambda c: {k: v for k, v in c.items() if k != "d_in"}
            ),
        ),
        ("cfg.json has layers [0, 'x']", lambda d: set_key(d / "cfg.json", "layers", [0, "x"])),
    ]:
        add(
            f"evaluate an SAE whose {what}",
            "json",
            eval_run,
            "error",
            sae_edit(fn),
            check=absent("e.json"),
        )
    resume = lambda w: mlsae("train", "--resume", w / "run", "--max-steps", "9")  # noqa: E731
    add(
        "resume a run whose train_cfg.json is {}",
        "json",
        resume,
        "error",
        lambda w: (copy("run", w), (w / "run" / "train_cfg.json").write_text("{}")) and None,
    )
    add(
        "resume a run whose train_cfg.json has lr '1e-3'",
        "json",
        resume,
        "error",
        lambda w: (
            (
                copy("run", w),
                edit_json(
                    w / "run" / "train_cfg.json",
                    lambda d: {**d, "train": {**d["train"], "lr": "1e-3"}},
                ),
            )
            and None
        ),
    )
    add(
        "resume a run whose metrics.jsonl ends in a torn line",
        "json",
        resume,
        "ok",
        lambda w: (
            (copy("run", w), open(w / "run" / "metrics.jsonl", "a").write('{"step": 7, "lo'))
            and None
        ),
        intact=lambda w: [E.base / "cache"],
    )
    add(
        "resume a run whose metrics.jsonl has a non-object row",
        "json",
        resume,
        "clean",
        lambda w: (copy("run", w), open(w / "run" / "metrics.jsonl", "a").write("[1]\n")) and None,
        intact=lambda w: [E.base / "cache"],
    )
    add(
        "resume a run whose checkpoint state.pt is truncated",
        "json",
        resume,
        "error",
        lambda w: (
            (
                copy("run", w),
                (w / "run/checkpoint/state.pt").write_bytes(
                    (w / "run/checkpoint/state.pt").read_bytes()[:1000]
                ),
            )
            and None
        ),
    )
    evo = lambda w: mlsae(
        "evolution",
        w / "per_layer",
        "--cache",
        E.base / "cache_test",  # noqa: E731
        "--out",
        w / "ev",
    )
    for what, text in [
        ("'saes' is a string", '{"saes": "x"}'),
        ("is not JSON", "{"),
        ("names a missing folder", '{"saes": [{"layer": 0, "path": "nope"}]}'),
        ("names a folder outside the run", '{"saes": [{"layer": 0, "path": "../run/sae"}]}'),
    ]:
        add(
            f"evolution on a per_layer.json that {what}",
            "json",
            evo,
            "error",
            lambda w, t=text: (
                (copy("per_layer", w), (w / "per_layer/per_layer.json").write_text(t)) and None
            ),
        )
    lens_eval = lambda w: mlsae(
        "lens",
        "evaluate",
        w / "lens",
        "--model",
        E.model,
        "--dataset",  # noqa: E731
        E.base / "corpus.jsonl",
        "--context-length",
        "64",
        "--tokens",
        "256",
        "--out",
        w / "le.json",
    )
    for what, fn in [
        ("n_layers '3'", lambda p: set_key(p, "n_layers", "3")),
        ("a list", lambda p: p.write_text("[]")),
        ("layers [0, 'a']", lambda p: set_key(p, "layers", [0, "a"])),
        ("max_cond 'x'", lambda p: set_key(p, "max_cond", "x")),
    ]:
        add(
            f"lens evaluate a lens.json with {what}",
            "json",
            lens_eval,
            "error",
            lambda w, f=fn: (copy("lens", w), f(w / "lens" / "lens.json")) and None,
        )
    add(
        "analyze a run whose eval.json has odd types",
        "json",
        lambda w: mlsae("analyze", w / "run", "--cache", E.base / "cache_test", "--out", w / "a"),
        "clean",
        lambda w: (
            (copy("run", w), (w / "run/eval.json").write_text('{"per_layer": 1, "mean": "x"}'))
            and None
        ),
    )

    # --- non-finite values
    add(
        "train on a cache with NaN vectors (hash-consistent)",
        "finite",
        train_cache,
        "error",
        lambda w: (copy("cache", w), rewrite_shard(w / "cache", 1, nan_rows)) and None,
        check=lambda w: sae_finite(w / "r" / "sae"),
    )
    add(
        "cache of a model whose activations hold NaN",
        "finite",
        lambda w: mlsae(
            "cache",
            "--model",
            w / "nanmodel",
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "512",
            "--context-length",
            "64",
            "--out",
            w / "c",
        ),
        "clean",
        lambda w: nan_model(w),
        check=no_nan_cache,
    )
    for lr in ("inf", "nan", "-1"):
        add(
            f"train --lr {lr}",
            "finite",
            lambda w, lr=lr: mlsae(
                "train",
                "--cache",
                E.base / "cache",
                "--expansion-factor",
                "2",
                "-k",
                "4",
                "--batch-tokens",
                "128",
                "--max-steps",
                "3",
                "--lr",
                lr,
                "--out",
                w / "r",
            ),
            "error",
            check=absent("r"),
        )
    for opt, val in (
        ("--eps", "nan"),
        ("--aux-coef", "inf"),
        ("--betas", "nan 0.9"),
        ("--test-fraction", "nan"),
    ):
        add(
            f"train {opt} {val}",
            "finite",
            lambda w, o=opt, v=val: mlsae(
                "train",
                "--cache",
                E.base / "cache",
                *TRAIN,
                "--max-steps",
                "3",
                o,
                *v.split(),
                "--out",
                w / "r",
            ),
            "error",
            check=absent("r"),
        )
    add(
        "train --lr 1e30 (diverges)",
        "finite",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            "--expansion-factor",
            "2",
            "-k",
            "4",
            "--batch-tokens",
            "128",
            "--max-steps",
            "10",
            "--lr",
            "1e30",
            "--out",
            w / "r",
        ),
        "error",
        check=lambda w: sae_finite(w / "r" / "sae"),
    )

    def weights(fn):
        def setup(w: Path) -> None:
            from safetensors.torch import load_file, save_file

            copy("run", w)
            p = w / "run" / "sae" / "sae.safetensors"
            save_file(fn(dict(load_file(str(p)))), str(p))

        return setup

    add(
        "evaluate an SAE with NaN weights",
        "finite",
        eval_run,
        "error",
        weights(lambda t: {**t, "W_dec": t["W_dec"] * float("nan")}),
        check=absent("e.json"),
    )
    add(
        "evaluate an SAE with integer weights",
        "finite",
        eval_run,
        "error",
        weights(lambda t: {k: v.long() for k, v in t.items()}),
        check=absent("e.json"),
    )
    add(
        "analyze an SAE with inf weights",
        "finite",
        lambda w: mlsae("analyze", w / "run", "--cache", E.base / "cache_test", "--out", w / "a"),
        "error",
        weights(lambda t: {**t, "b_enc": t["b_enc"] + float("inf")}),
    )

    # --- resume identity
    add(
        "resume after the cache was rebuilt at the same path",
        "resume",
        lambda w: mlsae("train", "--resume", w / "r", "--max-steps", "6"),
        "error",
        lambda w: copy("cache", w) and None,
        run=run_rebuilt_cache,
        intact=lambda w: [],
    )
    add(
        "two --resume of one run at once",
        "resume",
        lambda w: mlsae(
            "train", "--resume", w / "run", "--max-steps", "100000", "--epochs", "1000"
        ),
        "error",
        lambda w: copy("run", w) and None,
        run=run_two_resumes,
        intact=lambda w: [],
    )
    add(
        "resume after kill -9 (stale lock)",
        "resume",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            *TRAIN,
            "--checkpoint-every",
            "1",
            "--max-steps",
            "100000",
            "--epochs",
            "1000",
            "--out",
            w / "r",
        ),
        "ok",
        run=run_kill9_resume,
        intact=lambda w: [E.base / "cache"],
    )
    add(
        "a run refused for a bad option, reused with a good one",
        "resume",
        lambda w: mlsae(
            "train",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--context-length",
            "64",
            "--tokens",
            "1024",
            "--expansion-factor",
            "2",
            "--batch-tokens",
            "128",
            "--max-steps",
            "2",
            "--out",
            w / "r",
        ),
        "ok",
        run=run_rejected_then_reused,
        intact=lambda w: [],
    )
    add(
        "a run refused for a bad option leaves no folder",
        "resume",
        lambda w: mlsae(
            "train",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--context-length",
            "64",
            "--tokens",
            "1024",
            "--expansion-factor",
            "2",
            "-k",
            "999",
            "--out",
            w / "r",
        ),
        "error",
        check=absent("r"),
    )
    cache_cmd = lambda w: mlsae(
        "cache",
        "--model",
        E.model,
        "--dataset",
        E.base / "corpus.jsonl",  # noqa: E731
        "--context-length",
        "64",
        "--tokens",
        "4096",
        "--shard-tokens",
        "1024",
        "--storage-dtype",
        "float32",
        "--out",
        w / "cache",
    )

    def flip(w: Path) -> None:
        copy("cache", w)
        p = w / "cache" / "shard_00001.safetensors"
        b = bytearray(p.read_bytes())
        b[-10] ^= 0xFF
        p.write_bytes(bytes(b))

    def cache_valid(w: Path) -> str | None:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from mlsae.activations.cache import "
                "ActivationCache as C; c = C(sys.argv[1]); [c.load_block(i) for i in "
                "range(c.n_blocks)]",
                str(w / "cache"),
            ],
            env=ENV,
            capture_output=True,
            text=True,
        )
        return None if r.returncode == 0 else "the cache is still corrupt: " + r.stderr[-200:]

    add(
        "cache re-run on a complete cache with a corrupt shard",
        "resume",
        cache_cmd,
        "ok",
        flip,
        intact=lambda w: [],
        check=cache_valid,
    )
    add(
        "train on a cache with a corrupt shard",
        "resume",
        train_cache,
        "error",
        flip,
        match="corrupt",
    )

    # --- outputs replacing inputs or other kinds
    ev = lambda w, out: mlsae(
        "evaluate",
        w / "run",
        "--cache",
        w / "cache_test",  # noqa: E731
        "--out",
        out,
    )
    both = lambda w: (copy("run", w), copy("cache_test", w)) and None  # noqa: E731
    add(
        "evaluate --out CACHE/manifest.json",
        "outputs",
        lambda w: ev(w, w / "cache_test" / "manifest.json"),
        "error",
        both,
    )
    add(
        "evaluate --out CACHE/new.json",
        "outputs",
        lambda w: ev(w, w / "cache_test" / "new.json"),
        "error",
        both,
    )
    add(
        "evaluate --out RUN/sae/cfg.json",
        "outputs",
        lambda w: ev(w, w / "run" / "sae" / "cfg.json"),
        "error",
        both,
    )
    add(
        "evaluate --out RUN/train_cfg.json",
        "outputs",
        lambda w: ev(w, w / "run" / "train_cfg.json"),
        "error",
        both,
    )
    add("evaluate --out RUN (a folder)", "outputs", lambda w: ev(w, w / "run"), "error", both)
    add(
        "evaluate --out RUN/eval.json (README usage)",
        "outputs",
        lambda w: ev(w, w / "run" / "eval.json"),
        "ok",
        both,
        intact=lambda w: [w / "cache_test", w / "run" / "sae"],
        check=exists("run/eval.json"),
    )
    an = lambda w, out: mlsae("analyze", w / "run", "--cache", w / "cache_test", "--out", out)  # noqa: E731
    add("analyze --out CACHE", "outputs", lambda w: an(w, w / "cache_test"), "error", both)
    add("analyze --out RUN", "outputs", lambda w: an(w, w / "run"), "error", both)
    add("analyze --out RUN/sae", "outputs", lambda w: an(w, w / "run" / "sae"), "error", both)
    add(
        "analyze --out an existing analysis (re-run)",
        "outputs",
        lambda w: an(w, w / "analysis"),
        "ok",
        lambda w: (both(w), copy("analysis", w)) and None,
        intact=lambda w: [w / "cache_test", w / "run"],
    )
    add(
        "evolution --out CACHE",
        "outputs",
        lambda w: mlsae(
            "evolution", w / "per_layer", "--cache", w / "cache_test", "--out", w / "cache_test"
        ),
        "error",
        lambda w: (copy("per_layer", w), copy("cache_test", w)) and None,
    )
    add(
        "evolution --out an analysis folder",
        "outputs",
        lambda w: mlsae(
            "evolution",
            E.base / "per_layer",
            "--cache",
            E.base / "cache_test",
            "--out",
            w / "analysis",
        ),
        "error",
        lambda w: copy("analysis", w) and None,
    )
    add(
        "cache --out RUN",
        "outputs",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "256",
            "--context-length",
            "64",
            "--out",
            w / "run",
        ),
        "error",
        lambda w: copy("run", w) and None,
    )
    add(
        "cache --out LENS",
        "outputs",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "256",
            "--context-length",
            "64",
            "--out",
            w / "lens",
        ),
        "error",
        lambda w: copy("lens", w) and None,
    )
    add(
        "train --out CACHE",
        "outputs",
        lambda w: mlsae(
            "train", "--cache", w / "cache", *TRAIN, "--max-steps", "2", "--out", w / "cache"
        ),
        "error",
        lambda w: copy("cache", w) and None,
    )
    add(
        "lens train --out RUN/sae",
        "outputs",
        lambda w: mlsae(
            "lens",
            "train",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--context-length",
            "64",
            "--tokens",
            "256",
            "--steps",
            "1",
            "--out",
            w / "run" / "sae",
        ),
        "error",
        lambda w: copy("run", w) and None,
    )
    add(
        "lens evaluate LENS --out LENS/lens.json",
        "outputs",
        lambda w: mlsae(
            "lens",
            "evaluate",
            w / "lens",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--context-length",
            "64",
            "--tokens",
            "256",
            "--out",
            w / "lens" / "lens.json",
        ),
        "error",
        lambda w: copy("lens", w) and None,
    )
    add(
        "evaluate --cross --out CACHE",
        "outputs",
        lambda w: mlsae(
            "evaluate",
            "--cross",
            w / "run",
            w / "per_layer/layer_00",
            "--cache",
            w / "cache_test",
            "--out",
            w / "cache_test",
        ),
        "error",
        lambda w: (copy("run", w), copy("per_layer", w), copy("cache_test", w)) and None,
    )

    # --- resource limits
    add(
        "train --expansion-factor 100000",
        "memory",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            "--expansion-factor",
            "10000000",
            "-k",
            "4",
            "--max-steps",
            "2",
            "--out",
            w / "r",
        ),
        "error",
        check=absent("r"),
        match=r"GB",
    )
    add(
        "train --batch-tokens 100000000 on a small cache",
        "memory",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            "--expansion-factor",
            "2",
            "-k",
            "4",
            "--batch-tokens",
            "100000000",
            "--out",
            w / "r",
        ),
        "error",
        check=absent("r"),
    )

    # --- local text
    add(
        "cache --dataset corpus.txt --split test",
        "text",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.txt",
            "--split",
            "test",
            "--tokens",
            "512",
            "--context-length",
            "64",
            "--out",
            w / "c",
        ),
        "ok",
        intact=lambda w: [],
    )
    add(
        "cache --dataset corpus.txt --txt-documents line --split test",
        "text",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.txt",
            "--txt-documents",
            "line",
            "--split",
            "test",
            "--tokens",
            "512",
            "--context-length",
            "64",
            "--out",
            w / "c",
        ),
        "ok",
        intact=lambda w: [],
    )
    add(
        "cache --dataset one-paragraph.txt --split test",
        "text",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            w / "one.txt",
            "--split",
            "test",
            "--tokens",
            "64",
            "--context-length",
            "64",
            "--out",
            w / "c",
        ),
        "error",
        lambda w: (w / "one.txt").write_text("just one paragraph of text " * 20),
        match="split",
    )

    # --- command line
    add("unknown option", "cli", lambda w: mlsae("train", "--bogus", "1"), "error")
    add("missing required option", "cli", lambda w: mlsae("evaluate", E.base / "run"), "error")
    add("bad number", "cli", lambda w: mlsae("train", "--lr", "abc", "--out", w / "r"), "error")
    add(
        "bad choice",
        "cli",
        lambda w: mlsae("train", "--normalize", "zz", "--out", w / "r"),
        "error",
    )
    add("unknown command", "cli", lambda w: mlsae("trian"), "error")
    add(
        "--layers 5-2",
        "cli",
        lambda w: mlsae(
            "train", "--cache", E.base / "cache", *TRAIN, "--layers", "2-0", "--out", w / "r"
        ),
        "error",
        match="2-0",
    )
    add(
        "evaluate --layers 5-2",
        "cli",
        lambda w: mlsae(
            "evaluate",
            E.base / "run",
            "--cache",
            E.base / "cache_test",
            "--layers",
            "5-2",
            "--out",
            w / "e.json",
        ),
        "error",
        match="5-2",
    )
    add(
        "Ctrl-C during cache, then the same command",
        "cli",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "16384",
            "--context-length",
            "64",
            "--shard-tokens",
            "512",
            "--out",
            w / "c",
        ),
        "interrupt",
        run=run_sigint_cache,
        intact=lambda w: [],
    )
    surface_probes(add)
    checkpoint_probes(add)
    nproc_probes(add)
    return P


def no_nan_cache(w: Path) -> str | None:
    """A cache the command called complete holds no NaN among its used vectors."""
    import torch
    from safetensors.torch import load_file

    man = w / "c" / "manifest.json"
    if not man.exists() or not json.loads(man.read_text()).get("complete"):
        return None
    for p in sorted((w / "c").glob("shard_*.safetensors")):
        t = load_file(str(p))
        if not torch.isfinite(t["activations"][t["mask"]]).all():
            return f"{p.name} holds NaN vectors in a complete cache"
    return None


def nan_model(w: Path) -> None:
    """The tiny model with one block's weights NaN (its activations are NaN from there on)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(E.model)
    with torch.no_grad():
        m.transformer.h[1].mlp.c_proj.bias.fill_(float("nan"))
    m.save_pretrained(w / "nanmodel")
    AutoTokenizer.from_pretrained(E.model).save_pretrained(w / "nanmodel")


# ----------------------------------------------------------------------------- issue 29 surfaces


def mount_tmpfs(d: Path, size: str) -> bool:
    """A private tmpfs at d (root only); unmounted at teardown."""
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True
    )
    if r.returncode == 0:
        E.mounts.append(d)
    return r.returncode == 0


def fill_to(d: Path, leave: int) -> None:
    """Fill the file system of d until `leave` bytes are free."""
    free = shutil.disk_usage(d).free
    with contextlib.suppress(OSError), open(d / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def write_sparsify(d: Path, k: object = 4, weights: Callable[[dict], dict] | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    m, dm = 64, 32
    t = {
        "encoder.weight": torch.randn(m, dm, generator=g),
        "encoder.bias": torch.zeros(m),
        "W_dec": torch.randn(m, dm, generator=g),
        "b_dec": torch.zeros(dm),
    }
    save_file(weights(t) if weights else t, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"k": k, "activation": "topk", "d_in": dm}))


def write_paper(d: Path, **cfg: object) -> None:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    m, dm = 64, 32
    save_file(
        {
            "encoder.weight": torch.randn(m, dm, generator=g),
            "decoder.weight": torch.randn(dm, m, generator=g),
            "pre_encoder_bias": torch.zeros(dm),
        },
        str(d / "model.safetensors"),
    )
    base = {
        "n_inputs": dm,
        "n_latents": m,
        "k": 4,
        "standardize": True,
        "layers": [1],
        "model_name": str(E.model),
    }
    (d / "config.json").write_text(json.dumps({**base, **cfg}))


def write_pickle_bin(d: Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    write_paper(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))


def server_check(code: str) -> Callable[[Path, list[str]], tuple[int, str]]:
    """Run `code` (with `app`, `client`, `w`, `E` defined) in a subprocess: exit 0 = the
    expected behaviour, else its stderr says why."""

    def run(w: Path, cmd: list[str]) -> tuple[int, str]:
        prog = (
            "import sys, json; from pathlib import Path; from starlette.testclient import "
            "TestClient; from mlsae.explore.server import create_app\n"
            f"w = Path({str(w)!r}); base = Path({str(E.base)!r})\n" + code
        )
        r = subprocess.run(
            [sys.executable, "-c", prog], env=ENV, capture_output=True, text=True, timeout=TIMEOUT
        )
        return r.returncode, r.stderr

    return run


def explore_startup(w: Path, cmd: list[str]) -> tuple[int, str]:
    """`mlsae explore` that must refuse at startup: a server still running after 60 s fails."""
    try:
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 97, "the server started (no refusal at startup)"
    return r.returncode, r.stderr


def sql_edit(sql: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        import sqlite3

        copy("run", w)
        con = sqlite3.connect(w / "run" / "explore.sqlite")
        con.executescript(sql)
        con.commit()
        con.close()

    return setup


def surface_probes(add: Callable[..., None]) -> None:
    """Issue 29: index, export, import, the explorer's data, the stream's resume, model folders,
    corpora and the server."""
    run_copy = lambda w: copy("run", w) and None  # noqa: E731
    both = lambda w: (copy("run", w), copy("cache_test", w)) and None  # noqa: E731
    idx = lambda w, out: mlsae("index", w / "run", "--cache", w / "cache_test", "--out", out)  # noqa: E731

    # --- 1. index --out is checked like every output
    for what, rel in [
        ("RUN/sae/sae.safetensors", "run/sae/sae.safetensors"),
        ("CACHE/manifest.json", "cache_test/manifest.json"),
        ("a cache shard", "cache_test/shard_00000.safetensors"),
        ("RUN/train_cfg.json", "run/train_cfg.json"),
        ("CACHE/new.sqlite", "cache_test/new.sqlite"),
        ("an existing text file", "notes.txt"),
    ]:
        add(
            f"index --out {what}",
            "index-out",
            lambda w, r=rel: idx(w, w / r),
            "error",
            lambda w: (both(w), (w / "notes.txt").write_text("mine")) and None,
        )
    for cmd_name, make in [
        ("index", lambda w, o: idx(w, o)),
        (
            "evaluate",
            lambda w, o: mlsae("evaluate", w / "run", "--cache", w / "cache_test", "--out", o),
        ),
    ]:
        add(
            f"{cmd_name} --out a FIFO",
            "index-out",
            lambda w, m=make: m(w, w / "fifo"),
            "error",
            lambda w: (both(w), os.mkfifo(w / "fifo")) and None,
        )
        add(
            f"{cmd_name} --out a character device",
            "index-out",
            lambda w, m=make: m(w, w / "null"),
            "error",
            lambda w: (both(w), os.mknod(w / "null", 0o666 | 0o020000, os.makedev(1, 3))) and None,
        )
        add(
            f"{cmd_name} --out a symlink to a file",
            "index-out",
            lambda w, m=make: m(w, w / "link"),
            "error",
            lambda w: (
                (both(w), (w / "t.txt").write_text("x"), (w / "link").symlink_to(w / "t.txt"))
                and None
            ),
        )
    add(
        "index --out a new file",
        "index-out",
        lambda w: idx(w, w / "new.sqlite"),
        "ok",
        both,
        intact=lambda w: [w / "run", w / "cache_test"],
        check=exists("new.sqlite"),
    )

    # --- 2. export / import outputs
    exp = lambda w, out, *a: mlsae(
        "export",
        w / "run",
        "--format",
        "saelens",
        "--approximate",  # noqa: E731
        "--out",
        out,
        *a,
    )
    add(
        "export --out CACHE/x",
        "export-out",
        lambda w: exp(w, w / "cache_test" / "x"),
        "error",
        both,
    )
    add(
        "export --out a symlink into a cache",
        "export-out",
        lambda w: exp(w, w / "lnk" / "x"),
        "error",
        lambda w: (both(w), (w / "lnk").symlink_to(w / "cache_test")) and None,
    )
    add(
        "export --out RUN/x (inside its input)",
        "export-out",
        lambda w: exp(w, w / "run" / "x"),
        "error",
        run_copy,
    )
    add(
        "export --hook-format '../../x.{layer}'",
        "export-out",
        lambda w: exp(w, w / "o" / "p", "--hook-format", "../../x.{layer}"),
        "error",
        run_copy,
        check=absent("x.0"),
    )
    add(
        "export --hook-format absolute",
        "export-out",
        lambda w: exp(w, w / "o", "--hook-format", str(w / "abs.{layer}")),
        "error",
        run_copy,
        check=absent("abs.0"),
    )
    add(
        "export over a training run at --out/<hook>",
        "export-out",
        lambda w: exp(w, w / "o", "--hook-format", "r{layer}"),
        "error",
        lambda w: (copy("run", w), copy("run", w, "o/r0")) and None,
    )
    add(
        "export --out a new folder",
        "export-out",
        lambda w: exp(w, w / "o"),
        "ok",
        run_copy,
        intact=lambda w: [w / "run"],
        check=exists("o"),
    )
    imp = lambda w, out: mlsae(
        "import",
        "--format",
        "sparsify",
        w / "sp",
        "--layers",
        "1",  # noqa: E731
        "--model",
        E.model,
        "--out",
        out,
    )
    add(
        "import --out CACHE/sub",
        "export-out",
        lambda w: imp(w, w / "cache_test" / "sub"),
        "error",
        lambda w: (copy("cache_test", w), write_sparsify(w / "sp")) and None,
    )
    add(
        "import --out inside its source",
        "export-out",
        lambda w: imp(w, w / "sp" / "sub"),
        "error",
        lambda w: write_sparsify(w / "sp"),
    )

    # --- 3. a full disk never damages what exists
    def disk_with_index(w: Path) -> None:
        both(w)
        if mount_tmpfs(w / "disk", "4m"):
            shutil.copy2(E.base / "run" / "explore.sqlite", w / "disk" / "explore.sqlite")
            fill_to(w / "disk", 600_000)

    add(
        "index over a good index on a full disk",
        "full-disk",
        lambda w: idx(w, w / "disk" / "explore.sqlite"),
        "error",
        disk_with_index,
    )

    def disk_for_export(w: Path) -> None:
        run_copy(w)
        if mount_tmpfs(w / "disk", "4m"):
            fill_to(w / "disk", 1_100_000)

    add(
        "export on a full disk",
        "full-disk",
        lambda w: exp(w, w / "disk" / "o"),
        "error",
        disk_for_export,
        check=absent("disk/o/transformer.h.0"),
    )

    # --- 6. import is type-checked
    imp6 = lambda fmt: (
        lambda w: mlsae(
            "import",
            "--format",
            fmt,
            w / "src",
            "--out",
            w / "o",  # noqa: E731
            *(["--model", E.model] if fmt == "sparsify" else []),
        )
    )
    for what, setup in [
        ("k '4'", lambda w: write_sparsify(w / "src" / "layers.1", k="4")),
        ("k 4.7", lambda w: write_sparsify(w / "src" / "layers.1", k=4.7)),
        (
            "NaN weights",
            lambda w: write_sparsify(
                w / "src" / "layers.1", weights=lambda t: {**t, "W_dec": t["W_dec"] * float("nan")}
            ),
        ),
        ("k a list", lambda w: write_sparsify(w / "src" / "layers.1", k=[4])),
    ]:
        add(
            f"import sparsify with {what}",
            "import",
            imp6("sparsify"),
            "error",
            setup,
            check=absent("o/cfg.json"),
        )
    for what, cfg in [
        ("layers '012'", {"layers": "012"}),
        ("k 4.7", {"k": 4.7}),
        ("standardize 'no'", {"standardize": "no"}),
        ("model_name 5", {"model_name": 5}),
        ("n_latents a string", {"k": "x"}),
    ]:
        add(
            f"import a paper checkpoint with {what}",
            "import",
            imp6("mlsae-hub"),
            "error",
            lambda w, c=cfg: write_paper(w / "src", **c),
            check=absent("o/cfg.json"),
        )
    add(
        "import a pickle payload",
        "import",
        imp6("mlsae-hub"),
        "error",
        lambda w: write_pickle_bin(w / "src"),
        check=absent("o/cfg.json"),
    )

    # --- 8. the live stream's resume is fingerprinted
    stream = lambda w: mlsae(
        "train",
        "--model",
        w / "m",
        "--dataset",
        w / "corpus.jsonl",  # noqa: E731
        "--context-length",
        "64",
        "--tokens",
        "2048",
        *TRAIN,
        "--checkpoint-every",
        "2",
        "--max-steps",
        "2",
        "--out",
        w / "r",
    )

    def resumed_after(
        change: Callable[[Path], None],
    ) -> Callable[[Path, list[str]], tuple[int, str]]:
        def run(w: Path, cmd: list[str]) -> tuple[int, str]:
            shutil.copytree(E.model, w / "m")
            shutil.copy2(E.base / "corpus.jsonl", w / "corpus.jsonl")
            sh(stream(w))
            change(w)
            r = subprocess.run(
                mlsae("train", "--resume", w / "r", "--max-steps", "4"),
                env=ENV,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            return r.returncode, r.stderr

        return run

    def new_corpus(w: Path) -> None:
        rows = (w / "corpus.jsonl").read_text().splitlines()
        (w / "corpus.jsonl").write_text("\n".join(reversed(rows)) + "\n")

    def new_weights(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        p = w / "m" / "model.safetensors"
        t = load_file(str(p))
        save_file(
            {k: v * 1.5 if v.is_floating_point() else v for k, v in t.items()},
            str(p),
            metadata={"format": "pt"},
        )

    add(
        "resume a stream run after the corpus changed",
        "stream",
        stream,
        "error",
        run=resumed_after(new_corpus),
        intact=lambda w: [],
    )
    add(
        "resume a stream run after the model changed",
        "stream",
        stream,
        "error",
        run=resumed_after(new_weights),
        intact=lambda w: [],
    )
    add(
        "resume an unchanged stream run",
        "stream",
        stream,
        "ok",
        run=resumed_after(lambda w: None),
        intact=lambda w: [],
    )

    # --- 9. context length vs the model's positions (the tiny GPT-2 has 512)
    add(
        "cache --context-length 2048",
        "positions",
        lambda w: mlsae(
            "cache",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--tokens",
            "4096",
            "--context-length",
            "2048",
            "--out",
            w / "c",
        ),
        "error",
        check=absent("c"),
    )
    add(
        "train (stream) --context-length 2048",
        "positions",
        lambda w: mlsae(
            "train",
            "--model",
            E.model,
            "--dataset",
            E.base / "corpus.jsonl",
            "--context-length",
            "2048",
            "--tokens",
            "4096",
            *TRAIN,
            "--max-steps",
            "2",
            "--out",
            w / "r",
        ),
        "error",
        check=absent("r"),
    )

    # --- 10. model folders and corpora
    cache10 = lambda w, model=None, data=None: mlsae(  # noqa: E731
        "cache",
        "--model",
        model or E.model,
        "--dataset",
        data or E.base / "corpus.jsonl",
        "--tokens",
        "512",
        "--context-length",
        "64",
        "--out",
        w / "c",
    )

    def model_without_tokenizer(w: Path) -> None:
        shutil.copytree(E.model, w / "m")
        for f in (w / "m").iterdir():
            if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
                f.unlink()

    def truncated_weights(w: Path) -> None:
        shutil.copytree(E.model, w / "m")
        p = w / "m" / "model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    def string_n_layer(w: Path) -> None:
        shutil.copytree(E.model, w / "m")
        set_key(w / "m" / "config.json", "n_layer", "2")

    for what, setup in [
        ("without tokenizer files", model_without_tokenizer),
        ("with truncated weights", truncated_weights),
        ("with n_layer '2'", string_n_layer),
    ]:
        add(
            f"cache a model {what}",
            "model-corpus",
            lambda w: cache10(w, model=w / "m"),
            "error",
            setup,
            check=absent("c/manifest.json"),
        )

    def corpus_of(rows: list[object]) -> Callable[[Path], None]:
        def setup(w: Path) -> None:
            good = [json.loads(x) for x in (E.base / "corpus.jsonl").read_text().splitlines()[:200]]
            (w / "bad.jsonl").write_text(
                "\n".join(json.dumps(r) for r in good[:100] + rows + good[100:]) + "\n"
            )

        return setup

    for what, rows in [
        ("a JSON object as text", [{"text": {"a": 1}}]),
        ("a number as text", [{"text": 12345}]),
        ("a boolean as text", [{"text": True}]),
        ("a lone surrogate", [{"text": "ok \ud800 ok"}]),
    ]:
        add(
            f"cache a corpus with {what}",
            "model-corpus",
            lambda w: cache10(w, data=w / "bad.jsonl"),
            "error",
            corpus_of(rows),
            check=absent("c/manifest.json"),
        )

    # --- 4. the explorer refuses damaged data at startup
    explore = lambda w: mlsae("explore", w / "run", "--port", "0")  # noqa: E731
    for what, sql in [
        ("a missing table", "DROP TABLE latents;"),
        ("a non-JSON meta value", "UPDATE meta SET value = 'nope' WHERE key = 'window';"),
        ("a missing meta key", "DELETE FROM meta WHERE key = 'context_length';"),
        (
            "a wrong-size example blob",
            "UPDATE examples SET act = x'00' WHERE (sae, latent, kind, layer) IN (SELECT sae, latent, kind, layer FROM examples LIMIT 1);",
        ),
        ("a non-JSON latent info", "UPDATE latents SET info = '{' WHERE latent = 0;"),
        ("a string setting", "UPDATE meta SET value = '\"8\"' WHERE key = 'top_n';"),
        (
            "a stream id past the vocabulary",
            "UPDATE stream SET ids = x'ffffff7f' || substr(ids, 5);",
        ),
    ]:
        add(
            f"explore an index with {what}",
            "explorer-data",
            explore,
            "error",
            sql_edit(sql),
            run=explore_startup,
        )

    # --- 5. the live explorer stays on the index it started with
    add(
        "re-index under a running server",
        "explorer-live",
        lambda w: [],
        "ok",
        run_copy,
        run=server_check("""
app = create_app(w / 'run'); c = TestClient(app, base_url='http://127.0.0.1')
a = c.get('/api/latent?sae=0&latent=1').text
import subprocess, os
r = subprocess.run([sys.executable, '-m', 'mlsae', 'index', str(w / 'run'), '--cache', str(base / 'cache_test'), '--top-n', '2', '--window', '1'], capture_output=True, text=True)
assert r.returncode == 0, r.stderr[-500:]
import concurrent.futures as cf
with cf.ThreadPoolExecutor(4) as p:
    bodies = set(p.map(lambda _: c.get('/api/latent?sae=0&latent=1').text, range(8)))
if bodies != {a}: sys.exit('the same URL answered differently after re-indexing')
"""),
        intact=lambda w: [],
    )
    add(
        "delete the index under a running server",
        "explorer-live",
        lambda w: [],
        "ok",
        run_copy,
        run=server_check("""
app = create_app(w / 'run'); c = TestClient(app, base_url='http://127.0.0.1')
(w / 'run' / 'explore.sqlite').unlink()
r = c.get('/api/latent?sae=0&latent=1')
if r.status_code != 200: sys.exit(f'status {r.status_code} after the index was deleted')
"""),
        intact=lambda w: [],
    )
    add(
        "explore an SAE replaced after indexing",
        "explorer-live",
        explore,
        "error",
        lambda w: (copy("run", w), weights(w / "run" / "sae")) and None,
        run=explore_startup,
    )
    add(
        "explore --max-tokens above the model's positions",
        "explorer-live",
        lambda w: [],
        "ok",
        run=server_check("""
app = create_app(base / 'run', max_tokens=4096); c = TestClient(app, base_url='http://127.0.0.1')
r = c.get('/api/prompt', params={'sae': 0, 'text': 'ab ' * 600})
if r.status_code != 400: sys.exit(f'a prompt longer than the positions: status {r.status_code}')
"""),
        intact=lambda w: [],
    )

    # --- 12. the server
    add(
        "the server refuses a foreign Host header",
        "server",
        lambda w: [],
        "ok",
        run=server_check("""
app = create_app(base / 'run')
r = TestClient(app, base_url='http://evil.example').get('/api/info')
if r.status_code != 400: sys.exit(f'Host evil.example answered {r.status_code}')
"""),
        intact=lambda w: [],
    )
    add(
        "/api/info names no absolute path",
        "server",
        lambda w: [],
        "ok",
        run=server_check("""
app = create_app(base / 'run')
t = TestClient(app, base_url='http://127.0.0.1').get('/api/info').text
if str(base) in t: sys.exit('/api/info holds an absolute path')
"""),
        intact=lambda w: [],
    )

    # --- 11. smaller
    add(
        "train --seed 2**70",
        "small",
        lambda w: mlsae(
            "train",
            "--cache",
            E.base / "cache",
            *TRAIN,
            "--max-steps",
            "2",
            "--seed",
            str(2**70),
            "--out",
            w / "r",
        ),
        "error",
        check=absent("r"),
    )
    add(
        "index --n-logits above the vocabulary",
        "small",
        lambda w: mlsae(
            "index",
            w / "run",
            "--cache",
            E.base / "cache_test",
            "--n-logits",
            "100000",
            "--out",
            w / "i.sqlite",
        ),
        "error",
        run_copy,
    )
    add(
        "index an SAE whose cfg.json repeats a layer",
        "small",
        lambda w: mlsae(
            "index", w / "run", "--cache", E.base / "cache_test", "--out", w / "i.sqlite"
        ),
        "error",
        lambda w: (copy("run", w), set_key(w / "run/sae/cfg.json", "layers", [0, 0, 1])) and None,
    )
    add(
        "--layers -1",
        "small",
        lambda w: mlsae(
            "train", "--cache", E.base / "cache", *TRAIN, "--layers", "-1", "--out", w / "r"
        ),
        "error",
        match=r"^(?!.*1073741823)",
    )
    add(
        "a path with a newline",
        "small",
        lambda w: mlsae(
            "evaluate",
            w / "x\nmlsae: error: forged",
            "--cache",
            E.base / "cache_test",
            "--out",
            w / "e.json",
        ),
        "error",
    )
    add(
        "explore --model /nonexistent",
        "small",
        lambda w: mlsae("explore", E.base / "run", "--model", "/nonexistent", "--port", "0"),
        "error",
        run=explore_startup,
        intact=lambda w: [],
    )


def edit_checkpoint(fn: Callable[[dict], object], resum: bool = True) -> Callable[[Path], None]:
    """Setup: a copy of the run whose checkpoint payload `fn` edits in place (its sha256 in
    checkpoint.json updated when `resum`, so only the content checks can refuse it)."""

    def setup(w: Path) -> None:
        import torch

        copy("run", w)
        folder = w / "run" / "checkpoint"
        state = torch.load(folder / "state.pt", weights_only=True)
        fn(state)
        torch.save(state, folder / "state.pt")
        if resum:
            digest = hashlib.sha256((folder / "state.pt").read_bytes()).hexdigest()
            set_key(folder / "checkpoint.json", "sha256", digest)

    return setup


def flip_bit(offset_from_end: int, bit: int) -> Callable[[Path], None]:
    """Setup: a copy of the run with one bit of its checkpoint flipped (checksum kept)."""

    def setup(w: Path) -> None:
        copy("run", w)
        path = w / "run" / "checkpoint" / "state.pt"
        data = bytearray(path.read_bytes())
        data[len(data) - offset_from_end] ^= 1 << bit
        path.write_bytes(bytes(data))

    return setup


def checkpoint_probes(add: Callable[..., None]) -> None:
    """Issue 29 class 7: checkpoint contents are validated before a resume uses them."""
    resume = lambda w: mlsae("train", "--resume", w / "run", "--max-steps", "12")  # noqa: E731
    sae = lambda s: s["members"]["sae"]  # noqa: E731
    edits = [
        ("a flipped bit (sha256 kept)", flip_bit(4096, 3)),
        ("a flipped exponent bit (sha256 kept)", flip_bit(2000, 6)),
        ("a step of 10**6", edit_checkpoint(lambda s: s.update(step=10**6))),
        (
            "a wrong-shape W_enc",
            edit_checkpoint(lambda s: sae(s)["sae"].update(W_enc=sae(s)["sae"]["W_enc"][:, :3])),
        ),
        ("a missing W_dec", edit_checkpoint(lambda s: sae(s)["sae"].pop("W_dec"))),
        (
            "a string learning rate",
            edit_checkpoint(lambda s: sae(s)["opt"]["param_groups"][0].update(lr="fast")),
        ),
        ("no optimizer state", edit_checkpoint(lambda s: sae(s).pop("opt"))),
        (
            "a NaN weight",
            edit_checkpoint(lambda s: sae(s)["sae"]["b_dec"].__setitem__(0, float("nan"))),
        ),
    ]
    for what, setup in edits:
        add(
            f"train --resume a checkpoint with {what}",
            "checkpoint",
            resume,
            "error",
            setup,
            match=r"^(?!.*diverged)",
        )


def run_nproc_killed(w: Path, cmd: list[str]) -> tuple[int, str]:
    """`train --nproc 2` whose rank 1 kills itself (SIGKILL) after step 5."""
    r = subprocess.run(
        cmd, env={**ENV, "MLSAE_FAULT_KILL": "1:5"}, capture_output=True, text=True, timeout=TIMEOUT
    )
    return r.returncode, r.stderr


EXIT_THREADS = """
import os, torch
from mlsae.core.dist import session
from mlsae.core.config import TrainConfig
from mlsae.train.member import make_adam

with session() as comm:
    make_adam([torch.nn.Parameter(torch.ones(4))], TrainConfig(lr=1e-3))  # imports torch._dynamo
    comm.sum_(torch.ones(2))
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
if any("gloo" in n for n in names):
    raise SystemExit(f"gloo threads alive at exit (they abort the process now and then): {names}")
"""


def run_exit_threads(w: Path, cmd: list[str]) -> tuple[int, str]:
    """Two processes leave their session: a gloo thread still running at exit aborts the
    process now and then ("terminate called without an active exception")."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EXIT_THREADS],
            text=True,
            env={
                **ENV,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    bad = [(p.returncode, e) for p, (_, e) in zip(procs, outs, strict=True) if p.returncode]
    return (bad[0][0], bad[0][1][-300:]) if bad else (0, "")


def nproc_probes(add: Callable[..., None]) -> None:
    """Issue 29 classes 11 (a killed rank) and 13 (an abort at exit)."""
    add(
        "train --nproc 2 with rank 1 killed",
        "nproc",
        lambda w: mlsae(
            "train",
            "--nproc",
            "2",
            "--cache",
            E.base / "cache",
            *TRAIN,
            "--checkpoint-every",
            "3",
            "--max-steps",
            "12",
            "--out",
            w / "r",
        ),
        "error",
        run=run_nproc_killed,
        check=exists("r/checkpoint/checkpoint.json"),
        match=r"rank 1 of 2 was killed by signal 9 .*continue with",
    )
    add(
        "train --nproc 2 on a missing cache",
        "nproc",
        lambda w: mlsae("train", "--nproc", "2", "--cache", w / "nope", *TRAIN, "--out", w / "r"),
        "error",
        check=absent("r"),
    )
    add(
        "2 processes leave no gloo thread at exit",
        "exit-abort",
        lambda w: [],
        "ok",
        run=run_exit_threads,
        intact=lambda w: [],
    )


def weights(d: Path) -> None:
    """Replace an SAE's weights by other finite ones (same shapes)."""
    from safetensors.torch import load_file, save_file

    p = d / "sae.safetensors"
    t = load_file(str(p))
    save_file({k: v * 0.5 for k, v in t.items()}, str(p))


# ----------------------------------------------------------------------------- running


ERR = re.compile(r"^mlsae: error: ")


def judge(
    p: Probe, rc: int, err: str, before: dict[str, str], after: dict[str, str], w: Path
) -> tuple[bool, str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    n_err = sum(1 for ln in lines if ERR.match(ln))
    one_line = n_err == 1 and ERR.match(last) is not None
    why = []
    if "Traceback" in err:
        why.append("traceback")
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        why.append(f"{len(changed)} pre-existing file(s) changed or removed, e.g. {changed[0]}")
    if p.expect == "ok" and rc != 0:
        why.append(f"exit {rc}")
    elif p.expect == "error":
        if rc != 2:
            why.append(f"exit {rc}")
        if not one_line:
            why.append("not one `mlsae: error:` line")
        elif p.match and not re.search(p.match, last):
            why.append(f"message lacks /{p.match}/")
    elif p.expect == "clean" and not (rc == 0 or (rc == 2 and one_line)):
        why.append(f"exit {rc}, not a clean success or one error line")
    elif p.expect == "interrupt" and not (rc == 130 and last.startswith("mlsae: ")):
        why.append(f"exit {rc}, last line {last[:80]!r}")
    if p.check is not None and (c := p.check(w)):
        why.append(c)
    return not why, "; ".join(why)


def run_probe(p: Probe, work: Path, i: int) -> Result:
    w = work / f"p{i:02d}"
    w.mkdir()
    t0 = time.perf_counter()
    try:
        if p.setup is not None:
            p.setup(w)
        cmd = p.cmd(w)
        paths = p.intact(w) if p.intact is not None else ([w] if p.expect != "ok" else [])
        paths += [
            E.base / n
            for n in ("cache", "cache_test", "run", "per_layer", "lens", "analysis", "corpus.jsonl")
        ]
        before = tree_hash(*paths)
        if p.run is not None:
            rc, err = p.run(w, cmd)
        else:
            pre = None
            if p.limit_fsize is not None and E.full not in E.mounts:
                lim = p.limit_fsize
                pre = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))  # noqa: E731
            r = subprocess.run(
                cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=pre
            )
            rc, err = r.returncode, r.stderr
        after = tree_hash(*[q for q in paths if q.exists()])
        ok, why = judge(p, rc, err, before, after, w)
        last = ([ln for ln in err.splitlines() if ln.strip()] or [""])[-1]
    except Exception as e:  # noqa: BLE001 - a probe's own failure is a failed probe
        ok, why, rc, last = False, f"probe crashed: {type(e).__name__}: {e}", -1, ""
    finally:
        if E.full is not None and (E.full / "filler").exists():
            pass
    return Result(p, ok, rc, why, last, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", type=int, default=2, help="probes run at once")
    ap.add_argument("-k", default="", help="only probes whose name or class matches this regex")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unmount on the way out
    global E
    base = args.keep or Path(tempfile.mkdtemp(prefix="mlsae-probe-"))
    base.mkdir(parents=True, exist_ok=True)
    E = Env(base / "fixtures")
    t0 = time.perf_counter()
    if not (E.base / "analysis").exists():
        shutil.rmtree(E.base, ignore_errors=True)
        E.base.mkdir(parents=True)
        build_fixtures(E.base)
    print(f"fixtures in {E.base} ({time.perf_counter() - t0:.0f} s)", flush=True)
    chosen = [p for p in probes() if re.search(args.k, f"{p.cls} {p.name}")]
    work = Path(tempfile.mkdtemp(prefix="probes-", dir=base))
    full_users = [p for p in chosen if p.setup is fill_disk]
    results: list[Result] = []
    try:
        setup_mounts(E)
        # probes sharing the full disk run one at a time, before the others
        for i, p in enumerate(full_users):
            results.append(run_probe(p, work, i))
            for f in E.full.iterdir() if E.full else []:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            _report(results[-1])
        rest = [p for p in chosen if p not in full_users]
        with ThreadPoolExecutor(max(1, args.j)) as pool:
            futs = [
                pool.submit(run_probe, p, work, len(full_users) + i) for i, p in enumerate(rest)
            ]
            for f in futs:
                results.append(f.result())
                _report(results[-1])
    finally:
        teardown(E)
    classes: dict[str, list[bool]] = {}
    for r in results:
        classes.setdefault(r.probe.cls, []).append(r.ok)
    print()
    for c, oks in classes.items():
        print(f"{c:8s} {sum(oks):3d} pass {len(oks) - sum(oks):3d} fail")
    n_ok = sum(r.ok for r in results)
    print(
        f"{'total':8s} {n_ok:3d} pass {len(results) - n_ok:3d} fail "
        f"({len(results)} probes, {time.perf_counter() - t0:.0f} s)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "name": r.probe.name,
                        "class": r.probe.cls,
                        "ok": r.ok,
                        "rc": r.rc,
                        "why": r.why,
                        "last": r.last,
                    }
                    for r in results
                ],
                indent=1,
            )
        )
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


def _report(r: Result) -> None:
    mark = "PASS" if r.ok else "FAIL"
    tail = f" [{r.why}]" if r.why else ""
    print(f"{mark} {r.probe.cls:8s} {r.probe.name} (exit {r.rc}, {r.seconds:.0f} s){tail}")
    if r.last and (not r.ok or r.last.startswith("mlsae")):
        print(f"       {r.last[:160]}", flush=True)


if __name__ == "__main__":
    main()
