"""`mlsae synth generate`, the code of a base commit vs this tree, side by side in one run.

The base commit's `src/` is unpacked with `git archive` into a temporary folder (no worktree,
no stash); each repeat runs the base and then the current generator in fresh subprocesses
(PYTHONPATH = that tree's src) on the same settings and times `generate()` inside them
(imports excluded). Prints every time, the medians and their ratio, and checks that both wrote
the same data: the true layer statistics (truth.json) and the first shard's vectors (the new
code sums them in float32 over the firing pairs, the old in a dense float32 matmul: equal up to
float32 rounding).

    python bench/synth_generate.py [--base c17a85f] [--tokens 20000] [--layers 12]
        [--d-model 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = """
import sys, time
from pathlib import Path
from mlsae.synth.config import SynthConfig
from mlsae.synth.generate import generate
cfg = SynthConfig(n_layers={layers}, d_model={d}, n_features={d}, tokens={tokens},
                  test_tokens={test_tokens})
t = time.perf_counter()
generate(Path(sys.argv[1]), cfg)
print(time.perf_counter() - t)
"""


def unpack(base: str, into: Path) -> Path:
    """The base commit's src/ under `into`; returns that src folder."""
    archive = into / "base.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", base, "src"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(into / "base", filter="data")
    return into / "base" / "src"


def run(src: Path, code: str, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    res = subprocess.run(
        [sys.executable, "-c", code, str(out)], env=env, check=True, capture_output=True, text=True
    )
    return float(res.stdout.strip().splitlines()[-1])


def same_data(a: Path, b: Path) -> str:
    """How far the two outputs are apart: true statistics and the first shard's vectors."""
    from safetensors.torch import load_file

    ta, tb = (json.loads((p / "truth.json").read_text())["train"]["layer_stats"] for p in (a, b))
    keys = ("rel_var_latent", "rel_var_token", "multi_layer_fraction_token")
    stat = max(abs(ta[k] - tb[k]) for k in keys)
    xa, xb = (load_file(p / "train" / "shard_00000.safetensors")["activations"] for p in (a, b))
    dx = float((xa.double() - xb.double()).abs().max() / xa.double().abs().max())
    return f"true statistics differ by at most {stat:.1e}; vectors by {dx:.1e} of their max"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="c17a85f", help="the commit to compare with")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--test-tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    code = RUN.format(
        layers=args.layers, d=args.d_model, tokens=args.tokens, test_tokens=args.test_tokens
    )
    times: dict[str, list[float]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"base": unpack(args.base, Path(tmp)), "new": ROOT / "src"}
        for r in range(args.repeats):
            for name, src in srcs.items():
                times[name].append(run(src, code, Path(tmp) / f"{name}{r}"))
                print(f"repeat {r} {name:>4}: {times[name][-1]:7.2f} s", flush=True)
        print(same_data(Path(tmp) / "base0", Path(tmp) / "new0"))
    base, new = (statistics.median(times[k]) for k in ("base", "new"))
    print(
        f"{args.tokens} + {args.test_tokens} tokens x {args.layers} layers x d {args.d_model}: "
        f"base ({args.base}) {base:.2f} s, new {new:.2f} s (medians of {args.repeats}); "
        f"speed-up {base / new:.1f}x"
    )


if __name__ == "__main__":
    main()
