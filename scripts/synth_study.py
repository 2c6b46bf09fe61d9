"""The synthetic-truth study's grid (issue 25, docs/synthetic.md), run by scripts/synth_study.sh.

Data sets: base: drifts x seeds; `--norm-growth 19` and `--outlier-fraction 0.01`: every
drift with the first seed, and the first drift with every seed. On each: an MLSAE (per-vector standardisation, the default; with norm growth also
`--normalize none`) and per-layer SAEs (`--normalize none`) with `mlsae evolution`, every model
scored by `mlsae synth score`. Every step is a plain `mlsae` command, run inside this process
through the CLI app (torch is imported once: on a loaded machine the imports cost more than
these small trainings); OUT/commands.txt lists them all, to re-run any by hand.

    python scripts/synth_study.py OUT [--worker 0 --workers 2] [--drifts 0 5 15 30 60]
        [--seeds 0 1 2] [--conditions base growth outliers]
    python scripts/synth_study.py OUT --score-only TAG    # after a detector fix: re-run
        `mlsae evolution` (OUT/*/evolution_TAG) and `mlsae synth score` (OUT/*/*_TAG.json) on
        the SAEs already trained; the table then has the old and the TAG rows side by side

A step whose output exists is skipped (re-running resumes); a failing step is logged and its
data set's later steps skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

DATA = [
    "--n-layers",
    "6",
    "--d-model",
    "64",
    "--n-features",
    "48",
    "--tokens",
    "8192",
    "--test-tokens",
    "2048",
]
CONDITIONS = {
    "base": [],
    "growth": ["--norm-growth", "19"],
    "outliers": ["--outlier-fraction", "0.01"],
}
ML = [
    "--expansion-factor",
    "2",
    "-k",
    "4",
    "--batch-tokens",
    "1024",
    "--epochs",
    "8",
    "--lr",
    "1e-3",
]
PL = [
    "--per-layer",
    "--expansion-factor",
    "1",
    "-k",
    "4",
    "--batch-tokens",
    "256",
    "--epochs",
    "8",
    "--lr",
    "2e-3",
    "--normalize",
    "none",
]


class Failed(Exception):
    pass


def mlsae(out: Path, args: list[str]) -> None:
    """Run one `mlsae` command in this process; log it to OUT/commands.txt."""
    from mlsae.cli.app import app
    from mlsae.cli.errors import run_app

    line = "mlsae " + shlex.join(args)
    with open(out / "commands.txt", "a") as f:
        f.write(line + "\n")
    t = time.perf_counter()
    code = run_app(app, args)
    logging.info(f"[{time.perf_counter() - t:6.1f} s] {line} -> {code}")
    if code >= 128:  # interrupted (a signal): stop the worker
        sys.exit(code)
    if code:
        raise Failed(line)


def step(out: Path, done: Path, args: list[str]) -> None:
    """Run a step unless its output `done` exists; a folder it left unfinished (a killed run)
    is removed first (the study's own output)."""
    if done.exists():
        return
    folder = Path(args[args.index("--out") + 1])
    if folder.is_dir() and folder.suffix != ".json":
        logging.info(f"removing the unfinished {folder}")
        shutil.rmtree(folder)
    mlsae(out, args)


def dataset(out: Path, cond: str, drift: str, seed: str, score_only: str | None) -> None:
    """Every step on one data set (those whose output exists are skipped)."""
    d = out / f"{cond}_drift{drift}_seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    run = lambda done, args: step(out, done, args)  # noqa: E731
    if score_only is None:
        run(
            d / "data" / "truth.json",
            [
                "synth",
                "generate",
                "--out",
                str(d / "data"),
                *DATA,
                "--seed",
                seed,
                "--drift-deg",
                drift,
                *CONDITIONS[cond],
            ],
        )
    arms = [("mlsae", [])] + ([("mlsae_none", ["--normalize", "none"])] if cond == "growth" else [])
    tag = f"_{score_only}" if score_only else ""
    for name, extra in arms:
        if score_only is None:
            run(
                d / name / "final_fvu.json",
                [
                    "train",
                    "--cache",
                    str(d / "data" / "train"),
                    "--out",
                    str(d / name),
                    *ML,
                    "--seed",
                    seed,
                    *extra,
                ],
            )
        run(
            d / f"{name}{tag}.json",
            [
                "synth",
                "score",
                str(d / name),
                "--truth",
                str(d / "data"),
                "--out",
                str(d / f"{name}{tag}.json"),
            ],
        )
    if score_only is None:
        run(
            d / "per_layer" / "per_layer.json",
            [
                "train",
                "--cache",
                str(d / "data" / "train"),
                "--out",
                str(d / "per_layer"),
                *PL,
                "--seed",
                seed,
            ],
        )
    evo = d / f"evolution{tag}"
    run(
        evo / "evolution.json",
        ["evolution", str(d / "per_layer"), "--cache", str(d / "data" / "test"), "--out", str(evo)],
    )
    run(
        d / f"per_layer{tag}.json",
        [
            "synth",
            "score",
            str(d / "per_layer"),
            "--truth",
            str(d / "data"),
            "--evolution",
            str(evo),
            "--out",
            str(d / f"per_layer{tag}.json"),
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--drifts", nargs="*", default=["0", "5", "15", "30", "60"])
    ap.add_argument("--seeds", nargs="*", default=["0", "1", "2"])
    ap.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    ap.add_argument("--score-only", metavar="TAG", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[mlsae] %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(1)  # small models, a loaded 2-core machine: one thread per worker
    args.out.mkdir(parents=True, exist_ok=True)
    grid = [
        (c, d, s)
        for c in args.conditions
        for s in args.seeds
        for d in args.drifts
        if c == "base" or s == args.seeds[0] or d == args.drifts[0]
    ]
    for i, (cond, drift, seed) in enumerate(grid):
        if i % args.workers != args.worker:
            continue
        if args.score_only and not (args.out / f"{cond}_drift{drift}_seed{seed}").is_dir():
            continue
        t = time.perf_counter()
        try:
            dataset(args.out, cond, drift, seed, args.score_only)
        except Failed as e:
            logging.error(f"FAILED: {e}")
        print(f"{cond} drift {drift} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
