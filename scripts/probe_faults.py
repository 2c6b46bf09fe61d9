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
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}  # fmt: skip
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
    sh(mlsae("cache", *common, "--tokens", "4096", "--shard-tokens", "1024",
             "--storage-dtype", "float32", "--out", base / "cache"))  # fmt: skip
    sh(mlsae("cache", *common, "--split", "test", "--tokens", "1024", "--shard-tokens", "512",
             "--storage-dtype", "float32", "--out", base / "cache_test"))  # fmt: skip
    train = ["--expansion-factor", "2", "-k", "4", "--batch-tokens", "128", "--checkpoint-every",
             "3", "--lr", "1e-3"]  # fmt: skip
    sh(mlsae("train", "--cache", base / "cache", *train, "--max-steps", "6", "--out", base / "run"))
    sh(mlsae("train", "--cache", base / "cache", *train, "--max-steps", "6", "--per-layer",
             "--out", base / "per_layer"))  # fmt: skip
    sh(mlsae("lens", "train", "--model", m, "--dataset", c, "--context-length", "64",
             "--tokens", "512", "--steps", "1", "--out", base / "lens"))  # fmt: skip
    sh(mlsae("analyze", base / "run", "--cache", base / "cache_test", "--out", base / "analysis"))


def setup_mounts(env: Env) -> None:
    """A read-only folder and a nearly full disk: tmpfs mounts if allowed, else fallbacks."""
    ro, full = env.base / "ro", env.base / "full"
    for d in (ro, full):
        subprocess.run(["umount", str(d)], capture_output=True)  # left by a killed run
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    if os.geteuid() == 0 and shutil.which("mount"):
        a = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                           capture_output=True)  # fmt: skip
        b = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(full)],
                           capture_output=True)  # fmt: skip
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
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
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
    first = subprocess.Popen(cmd[:-2] + ["--out", str(w / "r")], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ck = w / "r" / "checkpoint" / "checkpoint.json"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and first.poll() is None and not ck.exists():
        time.sleep(0.05)
    first.kill()
    first.wait()
    r = subprocess.run(mlsae("train", "--resume", w / "r", "--max-steps", "12"), env=ENV,
                       capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    return r.returncode, r.stderr


def run_rebuilt_cache(w: Path, cmd: list[str]) -> tuple[int, str]:
    """Train, rebuild its cache at the same path from other data, resume."""
    sh(mlsae("train", "--cache", w / "cache", *TRAIN, "--max-steps", "3", "--out", w / "r"))
    shutil.rmtree(w / "cache")
    sh(mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.txt", "--context-length",
             "64", "--tokens", "4096", "--shard-tokens", "1024", "--storage-dtype", "float32",
             "--out", w / "cache"))  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return r.returncode, r.stderr


def run_rejected_then_reused(w: Path, cmd: list[str]) -> tuple[int, str]:
    """A run refused for a bad option, then the corrected command on the same --out."""
    bad = [*cmd, "-k", "999"]
    subprocess.run(bad, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    r = subprocess.run([*cmd, "-k", "4"], env=ENV, capture_output=True, text=True,
                       timeout=TIMEOUT)  # fmt: skip
    return r.returncode, r.stderr


# ----------------------------------------------------------------------------- the probes


def probes() -> list[Probe]:
    P = []  # noqa: N806
    add = lambda *a, **k: P.append(Probe(*a, **k))  # noqa: E731
    tc = lambda w: ["--cache", w / "cache_test"]  # noqa: E731
    ro = lambda: E.ro  # noqa: E731

    # --- file-system errors
    add("evaluate --out new/sub/e.json", "fs",
        lambda w: mlsae("evaluate", w / "run", *tc(w), "--out", w / "new/sub/e.json"),
        "ok", lambda w: (copy("run", w), copy("cache_test", w)) and None,
        check=exists("new/sub/e.json"))  # fmt: skip
    add("evaluate --out read-only/e.json", "fs",
        lambda w: mlsae("evaluate", E.base / "run", "--cache", E.base / "cache_test",
                        "--out", ro() / "e.json"), "error")  # fmt: skip
    add("evaluate --out read-only/sub/e.json", "fs",
        lambda w: mlsae("evaluate", E.base / "run", "--cache", E.base / "cache_test",
                        "--out", ro() / "sub" / "e.json"), "error")  # fmt: skip
    add("cache --out read-only/c", "fs",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--tokens", "256", "--context-length", "64", "--out", ro() / "c"),
        "error")  # fmt: skip
    add("train --out read-only/r", "fs",
        lambda w: mlsae("train", "--cache", E.base / "cache", *TRAIN, "--max-steps", "2",
                        "--out", ro() / "r"), "error")  # fmt: skip
    add("analyze --out read-only/a", "fs",
        lambda w: mlsae("analyze", E.base / "run", "--cache", E.base / "cache_test",
                        "--out", ro() / "a"), "error")  # fmt: skip
    add("evolution --out read-only/ev", "fs",
        lambda w: mlsae("evolution", E.base / "per_layer", "--cache", E.base / "cache_test",
                        "--out", ro() / "ev"), "error")  # fmt: skip
    add("lens train --out read-only/l", "fs",
        lambda w: mlsae("lens", "train", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--context-length", "64", "--tokens", "256", "--steps", "1",
                        "--out", ro() / "l"), "error")  # fmt: skip
    add("evaluate --out under a regular file", "fs",
        lambda w: mlsae("evaluate", E.base / "run", "--cache", E.base / "cache_test",
                        "--out", w / "afile" / "e.json"), "error",
        lambda w: (w / "afile").write_text("x"))  # fmt: skip
    add("cache --out on a full disk", "fs",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--tokens", "4096", "--context-length", "64", "--storage-dtype",
                        "float32", "--out", (E.full or w) / "c"), "error", fill_disk,
        limit_fsize=64_000, intact=lambda w: [])  # fmt: skip
    add("train --out on a full disk", "fs",
        lambda w: mlsae("train", "--cache", E.base / "cache", *TRAIN, "--max-steps", "4",
                        "--out", (E.full or w) / "r"), "error", fill_disk,
        limit_fsize=8_000, intact=lambda w: [E.base / "cache"])  # fmt: skip
    add("evaluate --out on a full disk", "fs",
        lambda w: mlsae("evaluate", E.base / "run", "--cache", E.base / "cache_test",
                        "--out", (E.full or w) / "e.json"), "error", fill_disk,
        limit_fsize=1_000, intact=lambda w: [E.base / "run"])  # fmt: skip
    add("cache --dataset non-UTF-8 .jsonl", "fs",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", w / "bad.jsonl", "--tokens",
                        "256", "--context-length", "64", "--out", w / "c"), "error",
        lambda w: (w / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9 \xff"}\n'),
        check=absent("c"))  # fmt: skip
    add("cache --dataset non-UTF-8 .txt", "fs",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", w / "bad.txt", "--tokens",
                        "256", "--context-length", "64", "--out", w / "c"), "clean",
        lambda w: (w / "bad.txt").write_bytes(b"caf\xe9 \xff " * 400 + b"\n\n" + b"ok " * 400))  # fmt: skip
    add("train --out a path whose parent is a file", "fs",
        lambda w: mlsae("train", "--cache", E.base / "cache", *TRAIN, "--max-steps", "2",
                        "--out", w / "afile" / "r"), "error",
        lambda w: (w / "afile").write_text("x"))  # fmt: skip

    # --- JSON read back without type checks
    def cache_edit(fn):
        def setup(w: Path) -> None:
            copy("cache", w)
            fn(w / "cache" / "manifest.json")

        return setup

    train_cache = lambda w: mlsae("train", "--cache", w / "cache", *TRAIN, "--max-steps", "2",  # noqa: E731
                                  "--out", w / "r")  # fmt: skip
    for what, fn in [
        ("d_model is a string", lambda p: set_key(p, "d_model", "32")),
        ("layers is a string", lambda p: set_key(p, "layers", "0,1,2")),
        ("a shard entry is a list", lambda p: edit_json(p, lambda d: {**d, "shards": [[1]] + d["shards"][1:]})),
        ("the manifest is a list", lambda p: p.write_text("[]")),
        ("complete is 'yes'", lambda p: set_key(p, "complete", "yes")),
        ("n_tokens is 1e3", lambda p: set_key(p, "n_tokens", 1e3)),
        ("shard name escapes the folder", lambda p: edit_json(p, lambda d: {**d, "shards": [{**d["shards"][0], "name": "../run/train_cfg.json"}] + d["shards"][1:]})),
        ("not UTF-8", lambda p: p.write_bytes(b"\xff\xfe{")),
    ]:  # fmt: skip
        add(
            f"train on a manifest whose {what}",
            "json",
            train_cache,
            "error",
            cache_edit(fn),
            check=absent("r"),
        )
    add("train on a manifest with an edited n_used", "json", train_cache, "error",
        cache_edit(lambda p: edit_json(p, lambda d: {**d, "shards": [{**s, "n_used": s["n_used"] // 2} for s in d["shards"]]})),
        check=absent("r/sae"))  # fmt: skip
    add("train on a manifest with edited token counts", "json", train_cache, "error",
        cache_edit(lambda p: edit_json(p, lambda d: {**d, "n_tokens": d["n_tokens"] - 64, "shards": [{**d["shards"][0], "n_tokens": d["shards"][0]["n_tokens"] - 64}] + d["shards"][1:]})),
        check=absent("r/sae"))  # fmt: skip

    def sae_edit(fn):
        def setup(w: Path) -> None:
            copy("run", w)
            fn(w / "run" / "sae")

        return setup

    eval_run = lambda w: mlsae("evaluate", w / "run", "--cache", E.base / "cache_test",  # noqa: E731
                               "--out", w / "e.json")  # fmt: skip
    for what, fn in [
        ("cfg.json is a list", lambda d: (d / "cfg.json").write_text("[1, 2]")),
        ("cfg.json has k '4'", lambda d: set_key(d / "cfg.json", "k", "4")),
        ("cfg.json has k 4.5", lambda d: set_key(d / "cfg.json", "k", 4.5)),
        ("cfg.json lacks d_in", lambda d: edit_json(d / "cfg.json", lambda c: {k: v for k, v in c.items() if k != "d_in"})),
        ("cfg.json has layers [0, 'x']", lambda d: set_key(d / "cfg.json", "layers", [0, "x"])),
    ]:  # fmt: skip
        add(
            f"evaluate an SAE whose {what}",
            "json",
            eval_run,
            "error",
            sae_edit(fn),
            check=absent("e.json"),
        )
    resume = lambda w: mlsae("train", "--resume", w / "run", "--max-steps", "9")  # noqa: E731
    add("resume a run whose train_cfg.json is {}", "json", resume, "error",
        lambda w: (copy("run", w), (w / "run" / "train_cfg.json").write_text("{}")) and None)  # fmt: skip
    add("resume a run whose train_cfg.json has lr '1e-3'", "json", resume, "error",
        lambda w: (copy("run", w), edit_json(w / "run" / "train_cfg.json",
                   lambda d: {**d, "train": {**d["train"], "lr": "1e-3"}})) and None)  # fmt: skip
    add("resume a run whose metrics.jsonl ends in a torn line", "json", resume, "ok",
        lambda w: (copy("run", w), open(w / "run" / "metrics.jsonl", "a").write('{"step": 7, "lo')) and None,
        intact=lambda w: [E.base / "cache"])  # fmt: skip
    add("resume a run whose metrics.jsonl has a non-object row", "json", resume, "clean",
        lambda w: (copy("run", w), open(w / "run" / "metrics.jsonl", "a").write("[1]\n")) and None,
        intact=lambda w: [E.base / "cache"])  # fmt: skip
    add("resume a run whose checkpoint state.pt is truncated", "json", resume, "error",
        lambda w: (copy("run", w), (w / "run/checkpoint/state.pt").write_bytes(
            (w / "run/checkpoint/state.pt").read_bytes()[:1000])) and None)  # fmt: skip
    evo = lambda w: mlsae("evolution", w / "per_layer", "--cache", E.base / "cache_test",  # noqa: E731
                          "--out", w / "ev")  # fmt: skip
    for what, text in [("'saes' is a string", '{"saes": "x"}'), ("is not JSON", "{"),
                       ("names a missing folder", '{"saes": [{"layer": 0, "path": "nope"}]}'),
                       ("names a folder outside the run", '{"saes": [{"layer": 0, "path": "../run/sae"}]}')]:  # fmt: skip
        add(f"evolution on a per_layer.json that {what}", "json", evo, "error",
            lambda w, t=text: (copy("per_layer", w), (w / "per_layer/per_layer.json").write_text(t)) and None)  # fmt: skip
    lens_eval = lambda w: mlsae("lens", "evaluate", w / "lens", "--model", E.model, "--dataset",  # noqa: E731
                                E.base / "corpus.jsonl", "--context-length", "64", "--tokens",
                                "256", "--out", w / "le.json")  # fmt: skip
    for what, fn in [("n_layers '3'", lambda p: set_key(p, "n_layers", "3")),
                     ("a list", lambda p: p.write_text("[]")),
                     ("layers [0, 'a']", lambda p: set_key(p, "layers", [0, "a"])),
                     ("max_cond 'x'", lambda p: set_key(p, "max_cond", "x"))]:  # fmt: skip
        add(
            f"lens evaluate a lens.json with {what}",
            "json",
            lens_eval,
            "error",
            lambda w, f=fn: (copy("lens", w), f(w / "lens" / "lens.json")) and None,
        )
    add("analyze a run whose eval.json has odd types", "json",
        lambda w: mlsae("analyze", w / "run", "--cache", E.base / "cache_test", "--out", w / "a"),
        "clean", lambda w: (copy("run", w), (w / "run/eval.json").write_text(
            '{"per_layer": 1, "mean": "x"}')) and None)  # fmt: skip

    # --- non-finite values
    add("train on a cache with NaN vectors (hash-consistent)", "finite", train_cache, "error",
        lambda w: (copy("cache", w), rewrite_shard(w / "cache", 1, nan_rows)) and None,
        check=lambda w: sae_finite(w / "r" / "sae"))  # fmt: skip
    add("cache of a model whose activations hold NaN", "finite",
        lambda w: mlsae("cache", "--model", w / "nanmodel", "--dataset", E.base / "corpus.jsonl",
                        "--tokens", "512", "--context-length", "64", "--out", w / "c"), "clean",
        lambda w: nan_model(w), check=no_nan_cache)  # fmt: skip
    for lr in ("inf", "nan", "-1"):
        add(f"train --lr {lr}", "finite",
            lambda w, lr=lr: mlsae("train", "--cache", E.base / "cache", "--expansion-factor", "2",
                                   "-k", "4", "--batch-tokens", "128", "--max-steps", "3", "--lr",
                                   lr, "--out", w / "r"), "error", check=absent("r"))  # fmt: skip
    for opt, val in (("--eps", "nan"), ("--aux-coef", "inf"), ("--betas", "nan 0.9"),
                     ("--test-fraction", "nan")):  # fmt: skip
        add(f"train {opt} {val}", "finite",
            lambda w, o=opt, v=val: mlsae("train", "--cache", E.base / "cache", *TRAIN,
                                          "--max-steps", "3", o, *v.split(), "--out", w / "r"),
            "error", check=absent("r"))  # fmt: skip
    add("train --lr 1e30 (diverges)", "finite",
        lambda w: mlsae("train", "--cache", E.base / "cache", "--expansion-factor", "2", "-k", "4",
                        "--batch-tokens", "128", "--max-steps", "10", "--lr", "1e30",
                        "--out", w / "r"), "error",
        check=lambda w: sae_finite(w / "r" / "sae"))  # fmt: skip

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
    add("analyze an SAE with inf weights", "finite",
        lambda w: mlsae("analyze", w / "run", "--cache", E.base / "cache_test", "--out", w / "a"),
        "error", weights(lambda t: {**t, "b_enc": t["b_enc"] + float("inf")}))  # fmt: skip

    # --- resume identity
    add("resume after the cache was rebuilt at the same path", "resume",
        lambda w: mlsae("train", "--resume", w / "r", "--max-steps", "6"), "error",
        lambda w: copy("cache", w) and None, run=run_rebuilt_cache, intact=lambda w: [])  # fmt: skip
    add("two --resume of one run at once", "resume",
        lambda w: mlsae("train", "--resume", w / "run", "--max-steps", "100000", "--epochs", "1000"),
        "error",
        lambda w: copy("run", w) and None, run=run_two_resumes, intact=lambda w: [])  # fmt: skip
    add("resume after kill -9 (stale lock)", "resume",
        lambda w: mlsae("train", "--cache", E.base / "cache", *TRAIN, "--checkpoint-every", "1",
                        "--max-steps", "100000", "--epochs", "1000", "--out", w / "r"), "ok",
        run=run_kill9_resume, intact=lambda w: [E.base / "cache"])  # fmt: skip
    add("a run refused for a bad option, reused with a good one", "resume",
        lambda w: mlsae("train", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--context-length", "64", "--tokens", "1024", "--expansion-factor", "2",
                        "--batch-tokens", "128", "--max-steps", "2", "--out", w / "r"),
        "ok", run=run_rejected_then_reused, intact=lambda w: [])  # fmt: skip
    add("a run refused for a bad option leaves no folder", "resume",
        lambda w: mlsae("train", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--context-length", "64", "--tokens", "1024", "--expansion-factor", "2",
                        "-k", "999", "--out", w / "r"), "error", check=absent("r"))  # fmt: skip
    cache_cmd = lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.jsonl",  # noqa: E731
                                "--context-length", "64", "--tokens", "4096", "--shard-tokens",
                                "1024", "--storage-dtype", "float32", "--out", w / "cache")  # fmt: skip

    def flip(w: Path) -> None:
        copy("cache", w)
        p = w / "cache" / "shard_00001.safetensors"
        b = bytearray(p.read_bytes())
        b[-10] ^= 0xFF
        p.write_bytes(bytes(b))

    def cache_valid(w: Path) -> str | None:
        r = subprocess.run([sys.executable, "-c", "import sys; from mlsae.activations.cache import "
                            "ActivationCache as C; c = C(sys.argv[1]); [c.load_block(i) for i in "
                            "range(c.n_blocks)]", str(w / "cache")], env=ENV, capture_output=True,
                           text=True)  # fmt: skip
        return None if r.returncode == 0 else "the cache is still corrupt: " + r.stderr[-200:]

    add("cache re-run on a complete cache with a corrupt shard", "resume", cache_cmd, "ok", flip,
        intact=lambda w: [], check=cache_valid)  # fmt: skip
    add("train on a cache with a corrupt shard", "resume", train_cache, "error", flip,
        match="corrupt")  # fmt: skip

    # --- outputs replacing inputs or other kinds
    ev = lambda w, out: mlsae("evaluate", w / "run", "--cache", w / "cache_test",  # noqa: E731
                              "--out", out)  # fmt: skip
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
    add("evaluate --out RUN/eval.json (README usage)", "outputs",
        lambda w: ev(w, w / "run" / "eval.json"), "ok", both,
        intact=lambda w: [w / "cache_test", w / "run" / "sae"], check=exists("run/eval.json"))  # fmt: skip
    an = lambda w, out: mlsae("analyze", w / "run", "--cache", w / "cache_test", "--out", out)  # noqa: E731
    add("analyze --out CACHE", "outputs", lambda w: an(w, w / "cache_test"), "error", both)
    add("analyze --out RUN", "outputs", lambda w: an(w, w / "run"), "error", both)
    add("analyze --out RUN/sae", "outputs", lambda w: an(w, w / "run" / "sae"), "error", both)
    add("analyze --out an existing analysis (re-run)", "outputs", lambda w: an(w, w / "analysis"),
        "ok", lambda w: (both(w), copy("analysis", w)) and None,
        intact=lambda w: [w / "cache_test", w / "run"])  # fmt: skip
    add("evolution --out CACHE", "outputs",
        lambda w: mlsae("evolution", w / "per_layer", "--cache", w / "cache_test", "--out",
                        w / "cache_test"), "error",
        lambda w: (copy("per_layer", w), copy("cache_test", w)) and None)  # fmt: skip
    add("evolution --out an analysis folder", "outputs",
        lambda w: mlsae("evolution", E.base / "per_layer", "--cache", E.base / "cache_test",
                        "--out", w / "analysis"), "error", lambda w: copy("analysis", w) and None)  # fmt: skip
    add("cache --out RUN", "outputs",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--tokens", "256", "--context-length", "64", "--out", w / "run"),
        "error", lambda w: copy("run", w) and None)  # fmt: skip
    add("cache --out LENS", "outputs",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--tokens", "256", "--context-length", "64", "--out", w / "lens"),
        "error", lambda w: copy("lens", w) and None)  # fmt: skip
    add("train --out CACHE", "outputs",
        lambda w: mlsae("train", "--cache", w / "cache", *TRAIN, "--max-steps", "2",
                        "--out", w / "cache"), "error", lambda w: copy("cache", w) and None)  # fmt: skip
    add("lens train --out RUN/sae", "outputs",
        lambda w: mlsae("lens", "train", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--context-length", "64", "--tokens", "256", "--steps", "1",
                        "--out", w / "run" / "sae"), "error", lambda w: copy("run", w) and None)  # fmt: skip
    add("lens evaluate LENS --out LENS/lens.json", "outputs",
        lambda w: mlsae("lens", "evaluate", w / "lens", "--model", E.model, "--dataset",
                        E.base / "corpus.jsonl", "--context-length", "64", "--tokens", "256",
                        "--out", w / "lens" / "lens.json"), "error",
        lambda w: copy("lens", w) and None)  # fmt: skip
    add("evaluate --cross --out CACHE", "outputs",
        lambda w: mlsae("evaluate", "--cross", w / "run", w / "per_layer/layer_00", "--cache",
                        w / "cache_test", "--out", w / "cache_test"), "error",
        lambda w: (copy("run", w), copy("per_layer", w), copy("cache_test", w)) and None)  # fmt: skip

    # --- resource limits
    add("train --expansion-factor 100000", "memory",
        lambda w: mlsae("train", "--cache", E.base / "cache", "--expansion-factor", "10000000",
                        "-k", "4", "--max-steps", "2", "--out", w / "r"), "error",
        check=absent("r"), match=r"GB")  # fmt: skip
    add("train --batch-tokens 100000000 on a small cache", "memory",
        lambda w: mlsae("train", "--cache", E.base / "cache", "--expansion-factor", "2", "-k", "4",
                        "--batch-tokens", "100000000", "--out", w / "r"), "error",
        check=absent("r"))  # fmt: skip

    # --- local text
    add("cache --dataset corpus.txt --split test", "text",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.txt",
                        "--split", "test", "--tokens", "512", "--context-length", "64",
                        "--out", w / "c"), "ok", intact=lambda w: [])  # fmt: skip
    add("cache --dataset corpus.txt --txt-documents line --split test", "text",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.txt",
                        "--txt-documents", "line", "--split", "test", "--tokens", "512",
                        "--context-length", "64", "--out", w / "c"), "ok", intact=lambda w: [])  # fmt: skip
    add("cache --dataset one-paragraph.txt --split test", "text",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", w / "one.txt", "--split",
                        "test", "--tokens", "64", "--context-length", "64", "--out", w / "c"),
        "error", lambda w: (w / "one.txt").write_text("just one paragraph of text " * 20),
        match="split")  # fmt: skip

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
    add("--layers 5-2", "cli",
        lambda w: mlsae("train", "--cache", E.base / "cache", *TRAIN, "--layers", "2-0",
                        "--out", w / "r"), "error", match="2-0")  # fmt: skip
    add("evaluate --layers 5-2", "cli",
        lambda w: mlsae("evaluate", E.base / "run", "--cache", E.base / "cache_test", "--layers",
                        "5-2", "--out", w / "e.json"), "error", match="5-2")  # fmt: skip
    add("Ctrl-C during cache, then the same command", "cli",
        lambda w: mlsae("cache", "--model", E.model, "--dataset", E.base / "corpus.jsonl",
                        "--tokens", "16384", "--context-length", "64", "--shard-tokens", "512",
                        "--out", w / "c"), "interrupt", run=run_sigint_cache,
        intact=lambda w: [])  # fmt: skip
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


# ----------------------------------------------------------------------------- running


ERR = re.compile(r"^mlsae: error: ")


def judge(p: Probe, rc: int, err: str, before: dict[str, str], after: dict[str, str],
          w: Path) -> tuple[bool, str]:  # fmt: skip
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
        paths += [E.base / n for n in ("cache", "cache_test", "run", "per_layer", "lens",
                                       "analysis", "corpus.jsonl")]  # fmt: skip
        before = tree_hash(*paths)
        if p.run is not None:
            rc, err = p.run(w, cmd)
        else:
            pre = None
            if p.limit_fsize is not None and E.full not in E.mounts:
                lim = p.limit_fsize
                pre = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))  # noqa: E731
            r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
                               preexec_fn=pre)  # fmt: skip
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
    print(f"{'total':8s} {n_ok:3d} pass {len(results) - n_ok:3d} fail "
          f"({len(results)} probes, {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([
            {"name": r.probe.name, "class": r.probe.cls, "ok": r.ok, "rc": r.rc, "why": r.why,
             "last": r.last} for r in results], indent=1))  # fmt: skip
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
