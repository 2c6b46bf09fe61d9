"""The seeds study's tables (scripts/seeds.sh), as Markdown on stdout:
`python scripts/seeds_report.py OUT [OUT ...]` (one OUT per model).

For each headline number: its mean +- sd over the seeds (sample sd), seed 0's 95% interval over
contexts (the percentile bootstrap of `mlsae evaluate` / `analyze` / `controls measures`), the
control it is judged against (a threshold, the single-layer baseline, the seed ceiling or the
token-permuted null) and a verdict by docs/findings.md's rule, computed by `verdict` below:

  "holds"          every seed's interval clears the control's interval of the same seed (or the
                   threshold) in the claimed direction, AND the range of the seeds' values
                   (min..max) clears the range of the control's values in that direction;
  "does not hold"  both clear it in the other direction;
  "inconclusive"   otherwise (an overlap, seeds disagreeing, or an interval missing).

Standard library only: it runs while the study does (it only reads; a missing file is "not run").
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Interval = tuple[float, float]
ABOVE, BELOW = "above", "below"
MODEL_NAMES = {"default": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}


@dataclass
class Measure:
    """One number over seeds: each seed's value and its 95% interval over contexts."""

    values: dict[int, float] = field(default_factory=dict)
    intervals: dict[int, Interval | None] = field(default_factory=dict)

    def add(self, seed: int, value: float | None, interval: Interval | None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.values[seed] = float(value)
        self.intervals[seed] = interval

    def scaled(self, factor: float) -> Measure:
        """The measure times a positive factor (values and intervals)."""
        ivs = {
            s: None if iv is None else (iv[0] * factor, iv[1] * factor)
            for s, iv in self.intervals.items()
        }
        return Measure({s: v * factor for s, v in self.values.items()}, ivs)


def constant(value: float, seeds: list[int]) -> Measure:
    """A threshold as a measure: the same value, a zero-width interval, at every seed."""
    return Measure({s: value for s in seeds}, {s: (value, value) for s in seeds})


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer values than they need)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def side(a: Interval, b: Interval) -> str | None:
    """ABOVE when a lies wholly above b, BELOW when wholly below, None when they overlap."""
    if a[0] > b[1]:
        return ABOVE
    if a[1] < b[0]:
        return BELOW
    return None


def verdict(observed: Measure, control: Measure | float, claim: str) -> str:
    """The module docstring's rule, on the seeds both measures have."""
    if claim not in (ABOVE, BELOW):
        raise ValueError(f"claim must be {ABOVE!r} or {BELOW!r}, not {claim!r}")
    if not isinstance(control, Measure):
        control = constant(float(control), list(observed.values))
    seeds = sorted(set(observed.values) & set(control.values))
    if not seeds:
        return "not run"
    sides = set()
    for s in seeds:
        a, b = observed.intervals.get(s), control.intervals.get(s)
        sides.add(None if a is None or b is None else side(a, b))
    obs = [observed.values[s] for s in seeds]
    ctl = [control.values[s] for s in seeds]
    sides.add(side((min(obs), max(obs)), (min(ctl), max(ctl))))
    if len(sides) != 1 or None in sides:
        return "inconclusive"
    return "holds" if sides == {claim} else "does not hold"


# ----------------------------------------------------------------------------- reading OUT


def load(path: Path) -> Any:
    """A JSON file, or None when it is missing or unreadable (a stage not run, or running)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def seed_dirs(out: Path) -> dict[int, Path]:
    """OUT/s<seed> folders by seed."""
    found = {}
    for d in out.glob("s*"):
        if d.is_dir() and d.name[1:].isdigit():
            found[int(d.name[1:])] = d
    return dict(sorted(found.items()))


def _iv(x: Any) -> Interval | None:
    if isinstance(x, dict) and x.get("low") is not None and x.get("high") is not None:
        return float(x["low"]), float(x["high"])
    if isinstance(x, list) and len(x) == 2 and None not in x:
        return float(x[0]), float(x[1])
    return None


def eval_at(doc: Any, key: str, layer: int | None) -> tuple[float | None, Interval | None]:
    """An `mlsae evaluate` JSON's metric `key` at `layer` (None: the mean over its layers)."""
    if not isinstance(doc, dict):
        return None, None
    ivs = (doc.get("intervals") or {}).get(key) or {}
    if layer is None:
        return (doc.get("mean") or {}).get(key), _iv(ivs.get("mean"))
    layers = doc.get("layers") or []
    if layer not in layers:
        return None, None
    i = layers.index(layer)
    per = (doc.get("per_layer") or {}).get(key)
    per_iv = ivs.get("per_layer") or []
    return (per[i] if per else None), (_iv(per_iv[i]) if i < len(per_iv) else None)


def analysis_at(doc: Any, key: str) -> tuple[float | None, Interval | None]:
    """An `mlsae analyze` JSON's number `key` and its interval."""
    if not isinstance(doc, dict):
        return None, None
    return doc.get(key), _iv((doc.get("intervals") or {}).get(key))


def control_at(doc: Any, kind: str, up: int, key: str) -> tuple[float | None, Interval | None]:
    """An `mlsae controls measures` JSON's `key` of the row (kind, up layer)."""
    for row in (doc or {}).get("rows", []) if isinstance(doc, dict) else []:
        if row.get("kind") == kind and row.get("up_layer") == up:
            return row.get(key), _iv((row.get("intervals") or {}).get(key))
    return None, None


def gather(out: Path, rel: str, extract: Any, *args: Any) -> Measure:
    """A Measure of extract(JSON of OUT/s<seed>/rel, *args) -> (value, interval) over seeds."""
    m = Measure()
    for s, d in seed_dirs(out).items():
        m.add(s, *extract(load(d / rel), *args))
    return m


@dataclass
class Row:
    """A table row: what is claimed, the measured number, what it is judged against."""

    claim: str
    observed: Measure
    control_name: str
    control: Measure | float
    direction: str


def singles(out: Path) -> list[int]:
    """The baselines' blocks (fvu_single.json's layers, of the first seed that has one)."""
    for d in seed_dirs(out).values():
        doc = load(d / "fvu_single.json")
        if isinstance(doc, dict):
            return [int(x) for x in doc.get("layers", [])]
    return []


def rows(out: Path) -> list[Row]:
    """The headline rows of one model's study."""
    out_rows: list[Row] = []
    analysis = "analysis/analysis.json"
    for b in singles(out):
        for key, what, src in (
            ("fvu", "FVU (all held-out tokens)", "fvu"),
            ("fvu_typical", "FVU without norm outliers", "fvu"),
            ("delta_ce", "delta CE (nats)", "ce"),
        ):
            mlsae = gather(out, f"{src}_mlsae.json", eval_at, key, b)
            single = gather(out, f"{src}_single.json", eval_at, key, b)
            if mlsae.values and single.values:
                claim = f"block {b} {what}: MLSAE <= 1.1 x single-layer SAE"
                ctl = single.scaled(1.1)
                out_rows.append(Row(claim, mlsae, "1.1 x single-layer SAE", ctl, BELOW))
        off = gather(out, f"off_single_{b:02d}.json", eval_at, "fvu", None)
        mlsae_mean = gather(out, "off_mlsae.json", eval_at, "fvu", None)
        claim = f"single-layer SAE of block {b}: mean FVU over all blocks above the MLSAE's"
        if off.values or mlsae_mean.values:
            out_rows.append(Row(claim, off, "MLSAE mean FVU", mlsae_mean, ABOVE))
    for key, claim, thr, direction in (
        ("multi_layer_fraction_aggregate", "aggregated, latents active at > 1 block", 0.5, ABOVE),
        (
            "multi_layer_fraction_token",
            "per token, latents active at > 1 block (paper: mostly one)",
            0.5,
            BELOW,
        ),
        (
            "rel_var_token",
            "per-token layer variance below the aggregated (SPEC rel_var_token)",
            1.0,
            BELOW,
        ),
        ("rel_var_token", "... by an order of magnitude (rel_var_token <= 0.1)", 0.1, BELOW),
    ):
        m = gather(out, analysis, analysis_at, key)
        out_rows.append(Row(claim, m, f"threshold {thr}", thr, direction))
    for b in singles(out):
        obs = gather(out, "controls.json", control_at, "observed", b, "pass_through")
        for kind, name, down in (
            ("perm_global", "token-permuted null", b + 1),
            ("seed", "seed ceiling", b),
        ):
            ctl = gather(out, "controls.json", control_at, kind, b, "pass_through")
            if obs.values or ctl.values:
                claim = f"pass-through {b} -> {b + 1} (Pearson >= 0.95) above the {name}"
                out_rows.append(Row(claim, obs, f"{name} ({b} -> {down})", ctl, ABOVE))
    return out_rows


# ----------------------------------------------------------------------------- printing


def emit(*lines: str) -> None:
    sys.stdout.write("\n".join(lines) + "\n")


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}" if abs(v) >= 10**-digits or v == 0 else f"{v:.2e}"


def fmt_measure(m: Measure | float) -> str:
    if not isinstance(m, Measure):
        return fmt(m)
    mean, sd = mean_sd(list(m.values.values()))
    if mean is None:
        return "not run"
    return f"{fmt(mean)} ± {fmt(sd)} (n={len(m.values)})"


def fmt_iv(m: Measure | float) -> str:
    if not isinstance(m, Measure) or not m.intervals:
        return ""
    first = min(m.intervals)
    iv = m.intervals[first]
    return "-" if iv is None else f"[{fmt(iv[0])}, {fmt(iv[1])}]"


def model_name(out: Path) -> str:
    man = load(out / "cache_train" / "manifest.json") or {}
    return MODEL_NAMES.get(man.get("model"), str(man.get("model")))


def geometry(out: Path) -> None:
    """Adjacent-block centred cosine and norm growth (a property of the held-out vectors, the
    same for every seed: seed 0's analysis)."""
    for d in seed_dirs(out).values():
        doc = load(d / "analysis" / "analysis.json")
        if not isinstance(doc, dict) or not doc.get("adjacent_cosine"):
            continue
        cos, norms = doc["adjacent_cosine"], doc.get("norm_mean") or []
        pairs = doc.get("adjacent_pairs") or []
        lo, hi = cos.index(min(cos)), cos.index(max(cos))
        emit(
            f"Geometry ({len(cos) + 1} blocks, {doc.get('n_tokens')} held-out tokens): adjacent "
            f"centred cosine median {fmt(statistics.median(cos))}, min {fmt(cos[lo])} at "
            f"{pairs[lo] if pairs else lo}, max {fmt(cos[hi])} at {pairs[hi] if pairs else hi}"
            + (
                f"; mean norm {fmt(norms[0], 1)} at block 0 to {fmt(norms[-1], 1)} at the last "
                f"({fmt(norms[-1] / norms[0], 1)}x)"
                if norms
                else ""
            ),
            "",
        )
        return


def centring(out: Path) -> None:
    """Seed 0's MLSAE beside the flipped-centring MLSAE (OUT/flip), same seed and tokens."""
    first = next(iter(seed_dirs(out).values()), None)
    if first is None or not (out / "flip").is_dir():
        return
    arms = [(f"seeds' MLSAE (seed {first.name[1:]})", first), ("flipped centring", out / "flip")]
    emit(
        "| MLSAE | centring | mean FVU [CI] | mean FVU w/o outliers | per-token multi-layer "
        "[CI] | aggregate [CI] | rel_var_token [CI] | rel_var_latent [CI] |",
        "|" + "---|" * 8,
    )
    for name, d in arms:
        cfg = load(d / "mlsae" / "sae" / "cfg.json")
        centre = "not run" if not cfg else "on" if cfg.get("center_layers") else "off"
        ev, an = load(d / "fvu_mlsae.json"), load(d / "analysis" / "analysis.json")
        cells = []
        for v, iv in (eval_at(ev, "fvu", None),):
            cells.append(f"{fmt(v)} [{fmt(iv[0]) if iv else '-'}, {fmt(iv[1]) if iv else '-'}]")
        cells.append(fmt(eval_at(ev, "fvu_typical", None)[0]))
        for key in (
            "multi_layer_fraction_token",
            "multi_layer_fraction_aggregate",
            "rel_var_token",
            "rel_var_latent",
        ):
            v, iv = analysis_at(an, key)
            cells.append(f"{fmt(v)} [{fmt(iv[0]) if iv else '-'}, {fmt(iv[1]) if iv else '-'}]")
        emit(f"| {name} | {centre} | " + " | ".join(cells) + " |")
    emit("")


def timings(out: Path) -> None:
    try:
        lines = (out / "timings.tsv").read_text().splitlines()[1:]
    except OSError:
        return
    parts = [ln.split("\t") for ln in lines if ln.count("\t") >= 2 and "\tskipped" not in ln]
    total = sum(int(p[1]) for p in parts)
    emit(
        "Wall times (s): "
        + ", ".join(f"{p[0]} {p[1]}" for p in parts)
        + f"; total {total} s ({total / 60:.0f} min)",
        "",
    )


def report(out: Path) -> None:
    emit(f"## {model_name(out)} (`{out}`; seeds {list(seed_dirs(out))})", "")
    emit(
        "| claim | observed: mean ± sd over seeds | seed 0's 95% CI | control | control: "
        "mean ± sd | control's seed-0 CI | verdict |",
        "|" + "---|" * 7,
    )
    for r in rows(out):
        emit(
            f"| {r.claim} | {fmt_measure(r.observed)} | {fmt_iv(r.observed)} | "
            f"{r.control_name} | {fmt_measure(r.control)} | {fmt_iv(r.control)} | "
            f"{verdict(r.observed, r.control, r.direction)} |"
        )
    emit("")
    geometry(out)
    centring(out)
    timings(out)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python scripts/seeds_report.py OUT [OUT ...]", file=sys.stderr)
        return 2
    for a in argv:
        report(Path(a))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
