"""Extraction benchmark (issue 2): capture throughput vs a bare truncated forward, cache bytes
per token, model load time (first with an empty cache, then cached).

    .venv/bin/python bench/extract.py [--model default] [--batch 8] [--seq 256] [--repeats 3]

Capture and the bare forward run on the same batch, interleaved (ABBA order) in one process;
the ratio of medians is printed (goal >= 0.9) for wall time and for process CPU time. On a
shared, busy machine wall time is noisy: use --threads 1 and trust the CPU-time ratio.
The model runs in --dtype (float32, the default: `mlsae` keeps the model in float32); the same
rows in the other dtype follow where the compute-dtype calibration did not find bf16 more than
2x slower on this CPU (or with --both-dtypes), with their throughput ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlsae.core.calibrate import cpu_calibration
from mlsae.core.compute import cpu_capability
from mlsae.core.config import ModelConfig
from mlsae.core.layers import iter_layers_arg
from mlsae.data.capture import capture, truncated_forward, used_mask
from mlsae.data.model import load_model


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed2(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def load_times(cfg: ModelConfig) -> tuple[float, float]:
    """Seconds for a load into an empty temporary MLSAE_CACHE, then for a second (cached) load."""
    old = os.environ.get("MLSAE_CACHE")
    with tempfile.TemporaryDirectory(prefix="mlsae-bench-cache-") as tmp:
        os.environ["MLSAE_CACHE"] = tmp
        try:
            first = _timed(lambda: load_model(cfg))
            second = _timed(lambda: load_model(cfg))
        finally:
            if old is None:
                os.environ.pop("MLSAE_CACHE", None)
            else:
                os.environ["MLSAE_CACHE"] = old
    return first, second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs (after one warm-up)")
    ap.add_argument("--skip-load", action="store_true", help="skip the load-time measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--both-dtypes", action="store_true", help="time the other dtype even if slow")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(model=args.model, dtype=args.dtype)  # type: ignore[arg-type]

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {cpu_capability()}")
    cal = cpu_calibration()
    print(f"auto compute dtype (SAE): {cal.summary()}")
    if not args.skip_load:
        first, second = load_times(cfg)
        print(f"model load: first (empty cache) {first:.1f} s, second (cached) {second:.2f} s")
    dtypes = [args.dtype]
    other = "bfloat16" if args.dtype == "float32" else "float32"
    if args.both_dtypes or cal.stage != "probe":
        dtypes.append(other)
    else:
        print(
            f"{other} rows skipped: the calibration found bf16 more than 2x slower here "
            "(--both-dtypes times them anyway)"
        )
    tps = {dt: time_capture(ModelConfig(model=args.model, dtype=dt), args) for dt in dtypes}  # type: ignore[arg-type]
    if len(tps) == 2:
        print(
            f"{other} / {args.dtype} capture throughput (median, wall): "
            f"{tps[other] / tps[args.dtype]:.2f}"
        )


def time_capture(cfg: ModelConfig, args: argparse.Namespace) -> float:
    """Capture vs bare forward of the model in cfg.dtype (printed); the cache's bytes per token;
    returns the capture's tokens/s (median, wall)."""
    lm = load_model(cfg)
    layers = iter_layers_arg(args.layers, lm.n_layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(lm.tokenizer), (args.batch, args.seq), generator=g)  # [B, T]
    ids[:, 0] = lm.tokenizer.eos_token_id
    n_tok = ids.numel()
    print(
        f"\nmodel {lm.name}: {lm.n_layers} blocks, d_model {lm.d_model}, dtype {cfg.dtype}; "
        f"batch {args.batch} x {args.seq} = {n_tok} tokens; capturing {len(layers)} layers"
    )

    def run_capture() -> None:
        capture(lm.model, ids, layers)  # [B, T, L, d]

    def run_bare() -> None:
        truncated_forward(lm.model, ids, max(layers))

    run_capture(), run_bare()  # warm-up
    tc: list[tuple[float, float]] = []  # (wall, cpu) per repeat
    tb: list[tuple[float, float]] = []
    for r in range(args.repeats):  # ABBA interleaving
        order = [(run_capture, tc), (run_bare, tb)]
        for fn, out in order if r % 2 == 0 else order[::-1]:
            out.append(_timed2(fn))
        print(
            f"  pair {r}: capture {tc[-1][0]:.2f} s wall / {tc[-1][1]:.2f} s cpu, "
            f"bare {tb[-1][0]:.2f} s wall / {tb[-1][1]:.2f} s cpu",
            file=sys.stderr,
        )
    wall_tps = n_tok / statistics.median(t[0] for t in tc)
    for i, what in enumerate(("wall", "cpu")):
        cap_tps = n_tok / statistics.median(t[i] for t in tc)
        bare_tps = n_tok / statistics.median(t[i] for t in tb)
        print(
            f"[{what:4}] capture {cap_tps:,.0f} tokens/s, bare forward truncated at block "
            f"{max(layers)} {bare_tps:,.0f} tokens/s: ratio {cap_tps / bare_tps:.3f} "
            f"(median of {args.repeats}; goal >= 0.9)"
        )

    # Cache bytes per token: one shard of this batch as the cache stores it.
    acts = capture(lm.model, ids, layers).reshape(n_tok, len(layers), lm.d_model)
    shard = {
        "activations": acts.to(torch.bfloat16).contiguous(),  # [n, L, d]
        "token_ids": ids.reshape(-1).to(torch.int64),  # [n]
        "mask": used_mask(ids, lm.special_ids).reshape(-1),  # [n]
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.safetensors"
        save_file(shard, str(path))
        size = path.stat().st_size
    analytic = len(layers) * lm.d_model * 2 + 8 + 1
    print(
        f"cache: {size / n_tok:,.1f} bytes/token on disk (analytic {analytic:,} = "
        f"{len(layers)} x {lm.d_model} x 2 B bf16 + 8 B id + 1 B mask); "
        f"{size / n_tok * 1e6 / 2**30:.1f} GiB per million tokens"
    )
    return wall_tps


if __name__ == "__main__":
    main()
