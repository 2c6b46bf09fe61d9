"""Scaling beyond one process and beyond a cache, measured on this machine.

Sections (all by default; each runs `mlsae` as subprocesses, repeats interleaved):
  procs   training vectors/s on an activation cache with 1 and with 2 processes (--nproc 2:
          torchrun, gloo, each process on its share of every batch and 1 thread; 1 process
          uses every core).
  stream  training from the model's live stream vs `mlsae cache` + training on the cache, the
          same tokens, layers and seed: training vectors/s and wall time end to end.
  memory  peak RSS of streaming training at two token counts (flat is the goal: the live
          stream keeps token ids, 2 bytes per token, and two shuffle buffers).
  evalmem peak RSS of `mlsae evaluate` on the live stream (no cache) at two token counts
          (its --layers assume a model of 30 blocks: the default SmolLM2).

Usage: .venv/bin/python bench/scale.py [--sections procs,stream,memory,evalmem] [--model default]
       [--tokens 4096 --tokens-big 16384] [--steps 20 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MLSAE = [sys.executable, "-m", "mlsae"]


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `mlsae ARGS`; (wall seconds, peak RSS in MB of that process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*MLSAE, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"mlsae {' '.join(args)} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss // 1024  # KiB on Linux


def train_vps(run_dir: Path, skip: int = 3) -> float:
    """Median training vectors/s over the logged steps (the first `skip` are warm-up)."""
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["vectors_per_s"] for r in rows[skip:]] or [r["vectors_per_s"] for r in rows]
    return statistics.median(vals)


def synthetic_cache(path: Path, n_tokens: int, n_layers: int, d: int) -> Path:
    """A cache of random sparse combinations of a dictionary (SAE throughput does not depend
    on where the vectors come from)."""
    from mlsae.activations.cache import CacheWriter

    g = torch.Generator().manual_seed(0)
    dic = torch.randn(4 * d, d, generator=g)
    meta = {
        "layers": list(range(n_layers)),
        "d_model": d,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "train",
        "context_length": 256,
    }
    w = CacheWriter(path, meta, shard_tokens=1024)
    for _ in range(0, n_tokens, 256):
        z = torch.zeros(256 * n_layers, 4 * d)
        z.scatter_(
            1,
            torch.randint(0, 4 * d, (256 * n_layers, 16), generator=g),
            torch.rand(256 * n_layers, 16, generator=g),
        )
        acts = (z @ dic).view(256, n_layers, d)
        mask = torch.ones(256, dtype=torch.bool)
        mask[0] = False
        w.add(acts, torch.randint(0, 1000, (256,), generator=g), mask)
    w.close()
    return path


def fmt_row(name: str, vals: list[float], unit: str) -> str:
    return f"  {name:<34} best {max(vals):>9.0f} {unit}   median {statistics.median(vals):>9.0f}"


def section_procs(tmp: Path, a: argparse.Namespace) -> None:
    cache = synthetic_cache(tmp / "cache", a.cache_tokens, a.cache_layers, a.d)
    base = [
        "train",
        "--cache",
        str(cache),
        "--batch-tokens",
        str(a.batch),
        "--max-steps",
        str(a.steps),
        "--expansion-factor",
        str(a.r),
        "-k",
        str(a.k),
        "--checkpoint-every",
        "100000",
    ]
    got: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(a.repeats):
        for n in (1, 2):
            out = tmp / f"p{n}_{rep}"
            wall, _ = run([*base, "--out", str(out), "--nproc", str(n)])
            got[n].append(train_vps(out))
            walls[n].append(wall)
            shutil.rmtree(out)
    print(
        f"\nprocs: training on a cache ({a.cache_tokens} tokens x {a.cache_layers} layers, "
        f"d {a.d}, R {a.r}, k {a.k}, batch {a.batch}, {a.steps} steps, {os.cpu_count()} cores)"
    )
    for n in (1, 2):
        print(fmt_row(f"{n} process(es): vectors/s", got[n], "vec/s"))
        print(f"  {'':<34} wall (incl. start-up) median {statistics.median(walls[n]):.1f} s")
    ratio = [b / a_ for a_, b in zip(got[1], got[2], strict=True)]
    print(
        f"  2 processes / 1 process: best {max(ratio):.2f}x, median {statistics.median(ratio):.2f}x"
    )


def section_stream(tmp: Path, a: argparse.Namespace) -> None:
    common = ["--model", a.model, "--tokens", str(a.tokens), "--shard-tokens", str(a.shard)]
    train = [
        "--batch-tokens",
        str(a.batch),
        "--expansion-factor",
        str(a.r),
        "-k",
        str(a.k),
        "--shuffle-buffer-shards",
        "2",
        "--checkpoint-every",
        "100000",
    ]
    rows: dict[str, list[float]] = {"stream": [], "cached": []}
    walls: dict[str, list[float]] = {"stream": [], "cache+train": []}
    for rep in range(a.repeats):
        out = tmp / f"s{rep}"
        wall, _ = run(["train", *common, *train, "--out", str(out)])
        rows["stream"].append(train_vps(out))
        walls["stream"].append(wall)
        cache = tmp / f"c{rep}"
        w1, _ = run(["cache", *common, "--split", "train", "--out", str(cache)])
        out2 = tmp / f"t{rep}"
        w2, _ = run(["train", "--cache", str(cache), *train, "--out", str(out2)])
        rows["cached"].append(train_vps(out2))
        walls["cache+train"].append(w1 + w2)
        same = json.loads((out / "final_fvu.json").read_text())["sae"]["mean"]["fvu"]
        other = json.loads((out2 / "final_fvu.json").read_text())["sae"]["mean"]["fvu"]
        print(f"  (repeat {rep}: final FVU stream {same:.6f}, cached {other:.6f})")
        for p in (out, cache, out2):
            shutil.rmtree(p)
    print(f"\nstream: {a.model}, {a.tokens} tokens, all layers, R {a.r}, k {a.k}, batch {a.batch}")
    print(fmt_row("streamed from the model: vectors/s", rows["stream"], "vec/s"))
    print(fmt_row("from a cache: vectors/s", rows["cached"], "vec/s"))
    for k, v in walls.items():
        print(f"  wall {k:<29} median {statistics.median(v):8.1f} s   best {min(v):8.1f} s")


def section_memory(tmp: Path, a: argparse.Namespace) -> None:
    train = [
        "--model",
        a.model,
        "--shard-tokens",
        str(a.shard),
        "--shuffle-buffer-shards",
        "2",
        "--batch-tokens",
        str(a.batch),
        "--expansion-factor",
        str(a.r),
        "-k",
        str(a.k),
        "--checkpoint-every",
        "100000",
    ]
    print(
        f"\nmemory: peak RSS of streaming training ({a.model}, blocks of {a.shard} tokens, "
        "2 per shuffle buffer, the whole stream read once)"
    )
    for n in (a.tokens, a.tokens_big):
        out = tmp / f"m{n}"
        wall, rss = run(["train", *train, "--tokens", str(n), "--out", str(out)])
        steps = len((out / "metrics.jsonl").read_text().splitlines())
        print(f"  {n:>9} tokens: peak RSS {rss:>6} MB   ({steps} steps, {wall:.0f} s)")
        shutil.rmtree(out)


def section_evalmem(tmp: Path, a: argparse.Namespace) -> None:
    run_dir = tmp / "sae"
    run(
        [
            "train",
            "--model",
            a.model,
            "--tokens",
            "2048",
            "--shard-tokens",
            str(a.shard),
            "--batch-tokens",
            str(a.batch),
            "--expansion-factor",
            str(a.r),
            "-k",
            str(a.k),
            "--max-steps",
            "3",
            "--out",
            str(run_dir),
        ]
    )
    print(
        f"\nevalmem: peak RSS of `mlsae evaluate --layers 0,15,29` (FVU, delta CE, KL) on the "
        f"live stream ({a.model}, test split, no cache)"
    )
    for n in (a.eval_tokens, 4 * a.eval_tokens):
        out = tmp / f"eval{n}.json"
        wall, rss = run(
            ["evaluate", str(run_dir), "--tokens", str(n), "--layers", "0,15,29", "--out", str(out)]
        )
        got = json.loads(out.read_text())["n_tokens"]
        print(f"  {n:>9} tokens: peak RSS {rss:>6} MB   ({got} tokens evaluated, {wall:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="procs,stream,memory,evalmem")
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--tokens-big", type=int, default=16384)
    ap.add_argument("--shard", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="evalmem: this and 4x")
    ap.add_argument("--cache-tokens", type=int, default=8192)
    ap.add_argument("--cache-layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    with tempfile.TemporaryDirectory(prefix="mlsae-scale-") as t:
        for s in a.sections.split(","):
            sections = {
                "procs": section_procs,
                "stream": section_stream,
                "memory": section_memory,
                "evalmem": section_evalmem,
            }
            sections[s](Path(t), a)


if __name__ == "__main__":
    main()
