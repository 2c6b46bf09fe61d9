"""The printed outcome of `mlsae evolution`: the per-pair table with intervals and nulls, and
the line stating every threshold the counts rest on (also in the report)."""

from __future__ import annotations

import math
from pathlib import Path

from mlsae.core.stage_config import EvolutionConfig
from mlsae.evolution.summary import RATES, EvolutionSummary, fmt_interval


def thresholds_line(cfg: EvolutionConfig) -> str:
    """Every threshold the counts rest on, in words (printed, and in the report)."""
    t = cfg.boolean_threshold
    exact = math.ceil(1 / (1 - t) - 1e-9) if t < 1 else None
    note = (
        f"; on a feature with fewer than {exact} active tokens a necessity / sufficiency "
        f">= {t} means exactly 1"
        if exact
        else ""
    )
    return (
        f"thresholds: pass-through best next Pearson >= {cfg.pass_through}; appear / disappear "
        f"no partner of Pearson >= {cfg.link_threshold}; AND / OR exactly two parents of "
        f"necessity / sufficiency >= {t}; specialised necessity >= {cfg.specialise_necessity} "
        f"and sufficiency <= {cfg.specialise_sufficiency}; 'active' > {cfg.active_fraction} x "
        f"the feature's max; AND / OR / specialised only among features active on >= "
        f"{cfg.min_support} tokens (min_support){note}"
    )


def format_summary(body: EvolutionSummary, out: Path) -> str:
    """One line per layer pair (counts with the null model's in brackets), the thresholds, then
    the communities and where the outputs are."""
    null = any(s.null is not None for s in body.pairs)
    lines = [
        f"{'pair':>9} {'pass':>6} {'appear':>7} {'disapp':>7} {'AND':>8} {'OR':>8} "
        f"{'spec':>11} {'matchFVU':>9} {'unperm':>7} {'own':>6}"
    ]
    f = lambda v: "-" if v is None else f"{v:.3f}"
    for s, m in zip(body.pairs, body.match, strict=True):
        c = lambda v, k, nl=s.null: f"{v}" if nl is None else f"{v} ({getattr(nl, k)})"
        lines.append(
            f"{s.up_layer:>4}->{s.down_layer:<4} {f(s.pass_through):>6} "
            f"{f(s.appear):>7} {f(s.disappear):>7} {c(s.n_and, 'n_and'):>8} "
            f"{c(s.n_or, 'n_or'):>8} {c(s.n_specialised, 'n_specialised'):>11} "
            f"{f(m.matched):>9} {f(m.unpermuted):>7} {f(m.own):>6}"
        )
    if null:
        lines.append(
            f"(n): the same detectors with the down layer's tokens permuted (null "
            f"model, one global permutation, seed {body.settings.seed})"
        )
    if body.bootstrap is not None:
        b = body.bootstrap
        lines.append(
            f"95% intervals (bootstrap over {b.n_contexts} contexts, symmetric about the rate, "
            f"{b.n_resamples} resamples, seed {b.seed}; partners fixed):"
        )
        for s in body.pairs:
            iv = " ".join(f"{k} {fmt_interval(s.intervals.get(k), 0)}" for k in RATES)
            lines.append(f"{s.up_layer:>4}->{s.down_layer:<4} {iv}")
        fd = body.findings
        lines.append(
            f"over all pairs: mean pass-through {fd.pass_through_mean:.4f} "
            f"{fmt_interval(fd.intervals.get('pass_through_mean'), 0)}, AND + OR "
            f"{fd.boolean_fraction:.4f} {fmt_interval(fd.intervals.get('boolean_fraction'), 0)}, "
            f"specialised {fd.specialised_fraction:.4f} "
            f"{fmt_interval(fd.intervals.get('specialised_fraction'), 0)} (of alive features)"
        )
    lines.append(thresholds_line(body.settings))
    c = body.communities
    lines.append(
        f"communities ({c.method}): {c.n_communities} with >= 2 features, "
        f"largest {c.largest}, {c.n_singletons} singletons"
    )
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in body.phase_s.items())
    lines.append(
        f"wrote {out}/evolution.json, graph.json, graph.html ({body.time_s:.0f} s: "
        f"{phases}; peak RSS {body.peak_rss_mb:.0f} MB)"
    )
    return "\n".join(lines)
