"""AND / OR / specialisation detectors against the synthetic truth (issue 25): per seed, the
oracle per-layer SAEs (latents = the true features) and trained per-layer SAEs, the detector
at necessity / sufficiency 0.999 and 0.95, with and without --boolean-exclusive; precision and
recall from `mlsae synth score`, and the null model's counts.

    python scripts/andor_study.py DIR [DIR ...]     # each DIR: data/ (synth generate),
                                                    # oracle/ and trained/ (per-layer runs)
"""

from __future__ import annotations

import sys
from pathlib import Path

from mlsae.core.config import SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import EvolutionConfig
from mlsae.evolution.run import evolution_command
from mlsae.synth.command import score_command

ARMS = [(0.999, False), (0.999, True), (0.95, False), (0.95, True)]


def main() -> None:
    print(
        "| run | SAEs | threshold | exclusive | AND P / R | OR P / R | spec P / R | AND / OR / spec "
        "reported (null) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    f = lambda v: "-" if v is None else f"{v:.2f}"
    for root in map(Path, sys.argv[1:]):
        for sae in ("oracle", "trained"):
            for t, excl in ARMS:
                cfg = EvolutionConfig(boolean_threshold=t, boolean_exclusive=excl)
                out = root / f"evo_{sae}_{t}_{int(excl)}"
                if not (out / "evolution.json").exists():
                    inputs = Inputs.held_out(SourceConfig(cache=root / "data" / "test"))
                    evolution_command(root / sae, out, inputs=inputs, cfg=cfg)
                from mlsae.evolution.summary import load_evolution

                ev = load_evolution(out).summary
                s = score_command(root / sae, root / "data", out)
                e = {x.kind: x for x in s.edges}
                null = [
                    (p.null.n_and, p.null.n_or, p.null.n_specialised) for p in ev.pairs if p.null
                ]
                rep = (
                    f"{ev.findings.n_and} / {ev.findings.n_or} / {ev.findings.n_specialised} "
                    f"({sum(a for a, _, _ in null)} / {sum(b for _, b, _ in null)} / "
                    f"{sum(c for _, _, c in null)})"
                )
                print(
                    f"| {root.name} | {sae} | {t} | {excl} | "
                    + " | ".join(
                        f"{f(e[k].precision)} / {f(e[k].recall)}"
                        for k in ("and", "or", "specialised")
                    )
                    + f" | {rep} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
