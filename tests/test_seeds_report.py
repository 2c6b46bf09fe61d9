"""scripts/seeds_report.py: the verdict rule and the aggregation over seeds, on fabricated
inputs whose answers are worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seeds_report.py"


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("seeds_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seeds_report"] = mod  # dataclasses look their module up while building
    spec.loader.exec_module(mod)
    return mod


def tight(rep, values: dict[int, float], half: float = 0.005):
    """A Measure whose every seed's interval is value +- half."""
    return rep.Measure(dict(values), {s: (v - half, v + half) for s, v in values.items()})


def test_threshold_verdicts(rep):
    obs = rep.Measure(
        {0: 0.30, 1: 0.32, 2: 0.31}, {0: (0.28, 0.33), 1: (0.30, 0.34), 2: (0.29, 0.33)}
    )
    assert rep.verdict(obs, 0.5, rep.BELOW) == "holds"
    assert rep.verdict(obs, 0.5, rep.ABOVE) == "does not hold"
    # seed 1's interval reaches the threshold: overlap -> inconclusive
    assert rep.verdict(obs, 0.335, rep.BELOW) == "inconclusive"
    # every interval clears 0.345 but ... also the seeds' range (0.30..0.32) does: holds
    assert rep.verdict(obs, 0.345, rep.BELOW) == "holds"


def test_seed_spread_can_decide(rep):
    # each seed clears its own control (0.2 vs 0.1, 0.6 vs 0.5) but the seeds' ranges
    # (0.2..0.6 against 0.1..0.5) overlap: inconclusive by the rule
    obs = tight(rep, {0: 0.2, 1: 0.6})
    ctl = tight(rep, {0: 0.1, 1: 0.5})
    assert rep.verdict(obs, ctl, rep.ABOVE) == "inconclusive"
    # the same with the ranges apart (0.6..0.7 against 0.1..0.5): holds
    assert rep.verdict(tight(rep, {0: 0.6, 1: 0.7}), ctl, rep.ABOVE) == "holds"
    # seeds that disagree in direction: inconclusive
    mixed = tight(rep, {0: 0.2, 1: 0.4})
    assert rep.verdict(mixed, tight(rep, {0: 0.1, 1: 0.5}), rep.ABOVE) == "inconclusive"


def test_missing_interval_and_seed_pairing(rep):
    obs = rep.Measure({0: 0.9, 1: 0.95}, {0: (0.85, 0.92), 1: None})
    assert rep.verdict(obs, 0.5, rep.ABOVE) == "inconclusive"
    # only the seeds both measures have are compared (seed 2 of the control is ignored)
    obs = tight(rep, {0: 0.9, 1: 0.95})
    ctl = tight(rep, {0: 0.1, 1: 0.2, 2: 0.99})
    assert rep.verdict(obs, ctl, rep.ABOVE) == "holds"
    assert rep.verdict(rep.Measure(), 0.5, rep.ABOVE) == "not run"
    with pytest.raises(ValueError):
        rep.verdict(obs, 0.5, "sideways")


def test_scaled_and_mean_sd(rep):
    m = rep.Measure({0: 0.1, 1: 0.2}, {0: (0.09, 0.11), 1: None}).scaled(1.1)
    assert m.values == pytest.approx({0: 0.11, 1: 0.22})
    assert m.intervals[0] == pytest.approx((0.099, 0.121))
    assert m.intervals[1] is None
    mean, sd = rep.mean_sd([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert sd == pytest.approx(1.0)  # sample sd: sqrt((1 + 0 + 1) / 2)
    assert rep.mean_sd([4.0]) == (4.0, None)


def _eval(layers: list[int], fvu: list[float], half: float = 0.004) -> dict:
    return {
        "layers": layers,
        "per_layer": {"fvu": fvu},
        "mean": {"fvu": sum(fvu) / len(fvu)},
        "intervals": {
            "fvu": {
                "per_layer": [{"low": v - half, "high": v + half} for v in fvu],
                "mean": {"low": sum(fvu) / len(fvu) - half, "high": sum(fvu) / len(fvu) + half},
            }
        },
    }


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_rows_from_fabricated_study(rep, tmp_path, capsys):
    # block 3: MLSAE 0.05 / 0.06 / 0.07 vs 1.1 x single 0.10 -> 0.11: holds (below)
    # block 5: MLSAE 0.10 / 0.11 / 0.12 vs 1.1 x single 0.10 -> 0.11: inconclusive
    mlsae = {0: [0.05, 0.10], 1: [0.06, 0.11], 2: [0.07, 0.12]}
    frac = {0: 0.58, 1: 0.60, 2: 0.59}
    for s in (0, 1, 2):
        d = tmp_path / f"s{s}"
        _write(d / "fvu_mlsae.json", _eval([3, 5], mlsae[s]))
        _write(d / "fvu_single.json", _eval([3, 5], [0.10, 0.10]))
        an = {
            "multi_layer_fraction_token": frac[s],
            "intervals": {
                "multi_layer_fraction_token": {"low": frac[s] - 0.01, "high": frac[s] + 0.01}
            },
        }
        _write(d / "analysis" / "analysis.json", an)
        rows = [
            {
                "kind": "observed",
                "up_layer": 3,
                "pass_through": 0.02,
                "intervals": {"pass_through": [0.01, 0.03]},
            },
            {
                "kind": "seed",
                "up_layer": 3,
                "pass_through": 0.025,
                "intervals": {"pass_through": [0.015, 0.035]},
            },
            {
                "kind": "perm_global",
                "up_layer": 3,
                "pass_through": 0.0,
                "intervals": {"pass_through": [0.0, 0.002]},
            },
        ]
        _write(d / "controls.json", {"rows": rows})
    got = {r.claim: r for r in rep.rows(tmp_path)}
    r3 = got["block 3 FVU (all held-out tokens): MLSAE <= 1.1 x single-layer SAE"]
    assert sorted(r3.observed.values) == [0, 1, 2]
    assert rep.mean_sd(list(r3.observed.values.values()))[0] == pytest.approx(0.06)
    assert rep.verdict(r3.observed, r3.control, r3.direction) == "holds"
    r5 = got["block 5 FVU (all held-out tokens): MLSAE <= 1.1 x single-layer SAE"]
    assert rep.verdict(r5.observed, r5.control, r5.direction) == "inconclusive"
    tok = got["per token, latents active at > 1 block (paper: mostly one)"]
    assert rep.verdict(tok.observed, tok.control, tok.direction) == "does not hold"
    pt = {r.control_name: r for r in got.values() if r.claim.startswith("pass-through 3 -> 4")}
    null, ceiling = pt["token-permuted null (3 -> 4)"], pt["seed ceiling (3 -> 3)"]
    assert rep.verdict(null.observed, null.control, null.direction) == "holds"
    assert rep.verdict(ceiling.observed, ceiling.control, ceiling.direction) == "inconclusive"
    # the printed table carries the same verdicts and the mean +- sd (0.060 +- 0.010)
    assert rep.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("| block 3 FVU (all"))
    assert "0.060 ± 0.010 (n=3)" in line and line.endswith("| holds |")
