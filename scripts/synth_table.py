"""The synthetic study's tables (docs/synthetic.md) from `mlsae synth score` JSONs (OUT/*/*.json,
data sets named CONDITION_driftD_seedS by scripts/synth_study.py):

    python scripts/synth_table.py OUT            # mean +- sd over seeds per condition, drift, model
    python scripts/synth_table.py --runs OUT     # one row per run
    python scripts/synth_table.py --drift OUT    # the decoder angles of scripts/synth_drift.py
                                                 # (OUT/*/drift.json), median over layer pairs

"Match angle" is the angle of the median decoder cosine of SAE Match's matched pairs of alive
latents (median over the adjacent pairs): the drift SAE Match sees between trained per-layer
SAEs. AND / OR are what `mlsae evolution`'s detector gives at the time of the run (before the
detector fix unless the model name carries a tag: per_layer_TAG, from --score-only TAG).
"""

import json
import math
import re
import statistics
import sys
from pathlib import Path

NAME = re.compile(r"^(?P<cond>.+)_drift(?P<drift>[\d.]+)_seed(?P<seed>\d+)$")
COLUMNS = [
    "MCC",
    "MCC layer 0",
    "span rho",
    "pass-through R",
    "pass-through P",
    "AND R",
    "AND P",
    "OR R",
    "OR P",
    "Match acc",
    "Match angle",
]


def match_angle(s: dict) -> float | None:
    """Degrees: arccos of the median over adjacent pairs of the alive pairs' median cosine."""
    cos = [
        c
        for c in (s.get("match") or {}).get("median_matched_cos_alive") or []
        if c is not None and not math.isnan(c)
    ]
    return math.degrees(math.acos(max(-1.0, min(1.0, statistics.median(cos))))) if cos else None


def values(s: dict) -> dict[str, float | None]:
    e = {x["kind"]: x for x in s.get("edges", [])}
    sp = s.get("spans") or {}
    return {
        "MCC": s["mcc"],
        "MCC layer 0": s["layers"][0]["mcc"],
        "span rho": sp.get("span_spearman"),
        "pass-through R": e.get("pass_through", {}).get("recall"),
        "pass-through P": e.get("pass_through", {}).get("precision"),
        "AND R": e.get("and", {}).get("recall"),
        "AND P": e.get("and", {}).get("precision"),
        "OR R": e.get("or", {}).get("recall"),
        "OR P": e.get("or", {}).get("precision"),
        "Match acc": (s.get("match") or {}).get("accuracy"),
        "Match angle": match_angle(s),
    }


def runs(outs: list[str]) -> list[tuple[str, str, str, str, dict]]:
    """(condition, drift, seed, model, values) of every score JSON."""
    rows = []
    for out in outs:
        for p in sorted(Path(out).glob("*/*.json")):
            m, body = NAME.match(p.parent.name), json.loads(p.read_text())
            if m is None or "mcc" not in body:  # not a `mlsae synth score` output
                continue
            rows.append((m["cond"], m["drift"], m["seed"], p.stem, values(body)))
    rows.sort(key=lambda r: (r[0], float(r[1]), r[3], r[2]))
    return rows


def cell(xs: list[float | None], angle: bool = False) -> str:
    ok = [x for x in xs if x is not None and not math.isnan(x)]
    if not ok:
        return "-"
    fmt = "{:.0f}" if angle else "{:.2f}"
    if len(ok) == 1:
        return fmt.format(ok[0])
    return fmt.format(statistics.mean(ok)) + " ± " + fmt.format(statistics.stdev(ok))


DRIFT_COLUMNS = ["true_pass_deg", "pass_deg", "match_q90_deg", "match_all_deg"]


def drift_table(outs: list[str]) -> None:
    """Per condition and drift: each angle's median over the layer pairs, mean +- sd over seeds."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for out in outs:
        for p in sorted(Path(out).glob("*/drift.json")):
            m = NAME.match(p.parent.name)
            if m is None:
                continue
            pairs = json.loads(p.read_text())["pairs"]
            med = {
                c: statistics.median([r[c] for r in pairs if r.get(c) is not None] or [math.nan])
                for c in DRIFT_COLUMNS
            }
            groups.setdefault((m["cond"], float(m["drift"])), []).append(med)
    print("| condition | true drift | seeds | " + " | ".join(DRIFT_COLUMNS) + " |")
    print("|" + "---|" * (3 + len(DRIFT_COLUMNS)))
    for (cond, drift), vs in sorted(groups.items()):
        cells = [cell([v[c] for v in vs], angle=True) for c in DRIFT_COLUMNS]
        print(f"| {cond} | {drift:g} | {len(vs)} | " + " | ".join(cells) + " |")


def main() -> None:
    args = sys.argv[1:]
    if "--drift" in args:
        drift_table([a for a in args if a != "--drift"])
        return
    per_run = "--runs" in args
    rows = runs([a for a in args if a != "--runs"])
    key = ["condition", "drift", "model"] + (["seed"] if per_run else ["seeds"])
    print("| " + " | ".join(key + COLUMNS) + " |")
    print("|" + "---|" * (len(key) + len(COLUMNS)))
    if per_run:
        for cond, drift, seed, model, v in rows:
            cells = [cell([v[c]], c == "Match angle") for c in COLUMNS]
            print(f"| {cond} | {drift} | {model} | {seed} | " + " | ".join(cells) + " |")
        return
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for cond, drift, _, model, v in rows:
        groups.setdefault((cond, drift, model), []).append(v)
    for (cond, drift, model), vs in groups.items():
        cells = [cell([v[c] for v in vs], c == "Match angle") for c in COLUMNS]
        print(f"| {cond} | {drift} | {model} | {len(vs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
