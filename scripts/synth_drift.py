"""The drift between adjacent per-layer SAEs that SAE Match and the pass-through detector see
(docs/synthetic.md "SmolLM2 drift"), for a per-layer run and its `mlsae evolution` output:

    python scripts/synth_drift.py RUN EVOLUTION [--pairs 0 5 10] [--truth DIR] [--out drift.json]

Per adjacent pair (l, l+1), as decoder angles (degrees, arccos of the cosine of unit decoder
rows, sign-folded as SAE Match folds them):
  match_all    median over SAE Match's matched pairs of alive latents (evolution.match)
  match_q90    the 90th percentile of those cosines (the best-aligned tenth), as an angle
  pass         median over the detector's pass-through pairs (best next-layer Pearson >= the
               threshold, from graph.json)
  true_pass    with --truth (synthetic data): median over SAE Match's pairs that join the latents
               matched to the same true feature at both layers (the true pass-through pairs):
               the true drift plus the noise of two trained SAEs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch


def angle(c: float) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def main() -> None:
    from mlsae.evolution.match import folded_decoder, match_permutation
    from mlsae.evolution.summary import load_evolution
    from mlsae.sae.folders import RunFolder, load_sae
    from mlsae.synth.score import alive_from_graph, recovery_at, reported_edges

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("evolution", type=Path)
    ap.add_argument("--pairs", type=int, nargs="*", default=None, help="up layers (default all)")
    ap.add_argument("--truth", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    saes = {ly: load_sae(d) for ly, d in RunFolder(args.run).per_layer_dirs()}
    evo = load_evolution(args.evolution, with_graph=True)
    graph = evo.graph
    assert graph is not None
    passed = reported_edges(evo.summary, graph)["pass_through"]
    truth = None
    if args.truth is not None:
        from mlsae.synth.truth import load_truth

        truth, _ = load_truth(args.truth)
    ups = args.pairs if args.pairs is not None else sorted(saes)[:-1]
    rows = []
    for ly in ups:
        t = time.perf_counter()
        up, down = saes[ly], saes[ly + 1]
        w_up, w_down = up.W_dec.detach().cpu(), down.W_dec.detach().cpu()
        perm = match_permutation(w_up, w_down)
        u, v = folded_decoder(w_up), folded_decoder(w_down)
        alive_up = alive_from_graph(graph, ly, up.cfg.d_sae)
        alive_down = alive_from_graph(graph, ly + 1, down.cfg.d_sae)
        ok = (perm >= 0) & alive_up & alive_down[perm.clamp_min(0)]
        cos = (u[ok] * v[perm[ok]]).sum(-1)
        pc = [float(u[a] @ v[b]) for lp, a, b in passed if lp == ly]
        row = {
            "up_layer": ly,
            "n_matched_alive": int(ok.sum()),
            "match_all_deg": angle(float(cos.median())) if len(cos) else None,
            "match_q90_deg": angle(float(cos.quantile(0.9))) if len(cos) else None,
            "n_pass": len(pc),
            "pass_deg": angle(statistics.median(pc)) if pc else None,
        }
        if truth is not None:
            centre = up.cfg.normalize != "none"
            ra = recovery_at(w_up, truth, ly, centre, 0.9).match
            rb = recovery_at(w_down, truth, ly + 1, centre, 0.9).match
            both = [f for f in ra if f in rb and int(perm[ra[f]]) == rb[f]]
            tc = [float(u[ra[f]] @ v[rb[f]]) for f in both]
            row["n_true_pass"] = len(tc)
            row["true_pass_deg"] = angle(statistics.median(tc)) if tc else None
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - t:.0f} s)", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"run": str(args.run), "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()
