"""What the context-bootstrap intervals add to `mlsae evaluate`, side by side in one process.

On an activation cache and a trained SAE run, the reconstruction pass of `evaluate` (the
engine's `recon_from_source`) with and without the per-context sums (`--bootstrap 0`), repeats
interleaved, then the intervals themselves (1,000 resamples: FVU, fvu_typical-free, and the
delta CE / KL ratios on sums of the same shape). Delta CE / KL by splicing is the same work
either way except one index_add per batch, so the figure to compare with is the whole
evaluation's wall time.

    python bench/bootstrap_cost.py RUN CACHE [--tokens 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mlsae.activations.cache import ActivationCache
from mlsae.core.stage_config import BootstrapConfig
from mlsae.eval.evaluate import load_entry, recon_from_source
from mlsae.sae.folders import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    src = ActivationCache(args.cache)
    entry = load_entry(RunFolder(args.run).sae_dir())
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.repeats):
        for mode in ("without", "with"):
            entry.bootstrap = mode == "with"
            entry.reset_metrics()
            t0 = time.perf_counter()
            recon_from_source([entry], src, args.tokens)
            times[mode].append(time.perf_counter() - t0)
    assert entry.contexts is not None
    n = entry.contexts.n_contexts
    with torch.inference_mode():  # delta CE / KL sums of the same shape as a real evaluation
        entry.contexts.n_pred += 1.0
    t0 = time.perf_counter()
    res = entry.result("bench", BootstrapConfig(bootstrap=args.resamples))
    t_iv = time.perf_counter() - t0
    assert res.intervals is not None
    wo, wi = statistics.median(times["without"]), statistics.median(times["with"])
    print(
        f"{len(entry.layers)} layers, {n} contexts, {entry.metrics.n_tokens} tokens, "
        f"{args.resamples} resamples (medians of {args.repeats} interleaved repeats)"
    )
    print(f"reconstruction pass without per-context sums: {wo:.2f} s")
    print(f"reconstruction pass with per-context sums:    {wi:.2f} s  (ratio {wi / wo:.3f})")
    print(
        f"intervals (FVU, delta CE, KL; per layer and mean): {t_iv:.2f} s "
        f"({t_iv / wo:.3f} x the reconstruction pass)"
    )


if __name__ == "__main__":
    main()
