"""Intervals over contexts for the evolution rates (SPEC 7, issue 24 item 1): pass-through,
appear, disappear, AND, OR and specialised, each a bootstrap over contexts with the one
bootstrap of core.bootstrap: the symmetric interval about the full-data rate (`symmetric`:
these threshold counts' resamples sit above their estimate, core.bootstrap says why).

A full per-context co-moment matrix is too big, so the partners are fixed by the classification
on all the data: each alive up feature's best next-layer partner, each alive down feature's best
previous one, the two parents of each reported AND / OR and the parent of each specialised
feature. One more pass over the codes collects per-context sums for those pairs only (x, y, x^2,
y^2, xy, |A|, |B|, |A & B| and the token count); each resample recomputes every Pearson,
necessity and sufficiency from its contexts' sums and re-classifies (the point estimate: the
same on all contexts, equal to the reported rate). The interval is therefore
conditional on the partners chosen (a feature whose best partner would change in a resample
keeps its full-data partner), and the fractions keep the full-data alive features as their
denominators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae.core.bootstrap import Bootstrap, ContextWeights, Interval
from mlsae.core.stage_config import BootstrapConfig, EvolutionConfig
from mlsae.evolution.codes import CodeStore
from mlsae.evolution.measures import PairResult
from mlsae.evolution.stats import F64, FeatureStats

SUMS = ("x", "y", "xx", "yy", "xy", "on_a", "on_b", "on_ab")


@dataclass
class Selected:
    """The (up, down) feature pairs one adjacent pair's rates rest on, and where each rate
    reads them (indices into the pair list; -1: no partner)."""

    ui: Tensor  # [E] up feature
    dj: Tensor  # [E] down feature
    next_e: Tensor  # [alive up] the best next partner's pair
    prev_e: Tensor  # [alive down] the best previous partner's pair
    and_e: Tensor  # [n_and, 2]
    or_e: Tensor  # [n_or, 2]
    spec_e: Tensor  # [n_specialised]


def select(r: PairResult, alive_up: Tensor, alive_dn: Tensor) -> Selected:
    """The pairs behind the rates of one pair result."""
    index: dict[tuple[int, int], int] = {}
    at = lambda i, j: index.setdefault((int(i), int(j)), len(index)) if i >= 0 and j >= 0 else -1
    up = alive_up.nonzero().flatten().tolist()
    dn = alive_dn.nonzero().flatten().tolist()
    ok_n = ~torch.isnan(r.best_next)
    ok_p = ~torch.isnan(r.best_prev)
    next_e = [at(i, r.best_next_idx[i]) if ok_n[i] else -1 for i in up]
    prev_e = [at(r.best_prev_idx[j], j) if ok_p[j] else -1 for j in dn]
    and_e = [[at(a, j), at(b, j)] for j, a, b in r.and_features]
    or_e = [[at(a, j), at(b, j)] for j, a, b in r.or_features]
    spec_e = [at(i, j) for j, i in r.specialised]
    keys = list(index)
    t = lambda x: torch.tensor(x, dtype=torch.int64)
    return Selected(
        ui=t([k[0] for k in keys]),
        dj=t([k[1] for k in keys]),
        next_e=t(next_e),
        prev_e=t(prev_e),
        and_e=t(and_e).reshape(-1, 2),
        or_e=t(or_e).reshape(-1, 2),
        spec_e=t(spec_e),
    )


def _dense(idx: Tensor, acts: Tensor, d: int) -> Tensor:
    """TopK codes [n, k] as dense activations [n, d] (float64)."""
    out = torch.zeros(idx.shape[0], d, dtype=F64)
    return out.scatter_(1, idx.long(), acts.to(F64))


def context_sums(
    store: CodeStore,
    p: int,
    sel: Selected,
    stats: tuple[FeatureStats, FeatureStats],
    thresholds: tuple[Tensor, Tensor],
    ctx: Tensor,
    n_contexts: int,
    chunk_rows: int = 512,
) -> Tensor:
    """[len(SUMS) + 1, C, E] per-context sums of the selected pairs of layer pair (p, p + 1)
    (the last row: the context's token count, the same for every pair)."""
    E = len(sel.ui)
    out = torch.zeros(len(SUMS) + 1, n_contexts, E, dtype=F64)
    up_s, dn_s = stats
    thr_a, thr_b = thresholds[0].to(F64)[sel.ui], thresholds[1].to(F64)[sel.dj]
    n = up_s.n
    for s in range(0, n, chunk_rows):
        stop = min(s + chunk_rows, n)
        a = _dense(*store.read(p, s, stop), up_s.d)[:, sel.ui]  # [n, E]
        b = _dense(*store.read(p + 1, s, stop), dn_s.d)[:, sel.dj]
        on_a, on_b = (a > thr_a).to(F64), (b > thr_b).to(F64)
        c = ctx[s:stop]
        for q, v in enumerate((a, b, a * a, b * b, a * b, on_a, on_b, on_a * on_b)):
            out[q].index_add_(0, c, v)
        out[-1].index_add_(0, c, torch.ones(stop - s, E, dtype=F64))
    return out


def resampled_measures(sums: Tensor, bs: ContextWeights) -> tuple[Tensor, Tensor, Tensor]:
    """Pearson, sufficiency and necessity [B, E] of every resample (as `measures.measures`:
    population moments over the resampled tokens, zeros included; NaN where undefined)."""
    x, y, xx, yy, xy, on_a, on_b, on_ab, n = (bs.sums(q) for q in sums)
    n = n.clamp_min(1)
    mx, my = x / n, y / n
    vx, vy = (xx / n - mx * mx).clamp_min(0), (yy / n - my * my).clamp_min(0)
    sd = (vx * vy).sqrt()
    pearson = torch.where(sd > 0, (xy / n - mx * my) / sd.clamp_min(1e-300), math.nan)
    suf = torch.where(on_a > 0, on_ab / on_a.clamp_min(1), math.nan)
    nec = torch.where(on_b > 0, on_ab / on_b.clamp_min(1), math.nan)
    return pearson.clamp(-1, 1), suf, nec


def classify(
    pearson: Tensor, suf: Tensor, nec: Tensor, sel: Selected, cfg: EvolutionConfig
) -> dict[str, Tensor]:
    """Each rate [B] of each resample from its measures [B, E] (rates as `pair_summary`)."""
    B = pearson.shape[0]
    ninf = torch.full((B, 1), -math.inf, dtype=F64)
    p = torch.cat([pearson.nan_to_num(nan=-math.inf), ninf], 1)  # column -1: no partner
    nxt, prv = p[:, sel.next_e], p[:, sel.prev_e]
    frac = lambda hits, n: hits.sum(1).to(F64) / n if n else torch.full((B,), math.nan)
    n_up, n_dn = len(sel.next_e), len(sel.prev_e)
    t = cfg.boolean_threshold
    ge = lambda m, e: m[:, e] >= t  # NaN compares False
    lt = lambda m, e: m[:, e] < t
    a1, a2 = sel.and_e[:, 0], sel.and_e[:, 1]
    and_ok = ge(nec, a1) & ge(nec, a2)
    o1, o2 = sel.or_e[:, 0], sel.or_e[:, 1]
    or_ok = ge(suf, o1) & ge(suf, o2)
    if cfg.boolean_exclusive:
        and_ok &= lt(suf, a1) & lt(suf, a2)
        or_ok &= lt(nec, o1) & lt(nec, o2) & (nec[:, o1] + nec[:, o2] >= t)
    e = sel.spec_e
    spec_ok = (nec[:, e] >= cfg.specialise_necessity) & (suf[:, e] <= cfg.specialise_sufficiency)
    return {
        "pass_through": frac(nxt >= cfg.pass_through, n_up),
        "disappear": frac(nxt < cfg.link_threshold, n_up),
        "appear": frac(prv < cfg.link_threshold, n_dn),
        "and_rate": frac(and_ok, n_dn),
        "or_rate": frac(or_ok, n_dn),
        "specialised": frac(spec_ok, n_dn),
    }


def rate_intervals(
    results: list[PairResult],
    stats: list[FeatureStats],
    store: CodeStore,
    cfg: EvolutionConfig,
    boot: BootstrapConfig,
    context_length: int,
) -> tuple[list[dict[str, Interval | None]], dict[str, Interval | None], Bootstrap]:
    """Per pair, the interval of each rate over the contexts of the used tokens; and of the
    headline findings over all pairs (`overall`), from the same resamples."""
    ctx_of = torch.from_numpy(store.positions() // max(context_length, 1))
    _, ctx = torch.unique(ctx_of, return_inverse=True)  # contexts with used tokens: 0..C-1
    n_contexts = int(ctx.max()) + 1 if len(ctx) else 0
    bs = Bootstrap(n_contexts, boot.bootstrap, boot.bootstrap_seed)
    thr = [s.threshold(cfg.active_fraction) for s in stats]
    out, rows, n_down = [], [], []
    for p, r in enumerate(results):
        sel = select(r, stats[p].alive, stats[p + 1].alive)
        sums = context_sums(
            store, p, sel, (stats[p], stats[p + 1]), (thr[p], thr[p + 1]), ctx, n_contexts
        )
        rates = classify(*_measures(sums, bs), sel, cfg)
        point = classify(*_measures(sums, bs.whole()), sel, cfg)
        out.append({k: bs.symmetric(v, float(point[k][0]), (0.0, 1.0)) for k, v in rates.items()})
        rows.append({k: torch.cat([point[k], v]) for k, v in rates.items()})
        n_down.append(len(sel.prev_e))
    found = overall(rows, n_down) if rows else {}
    return out, {k: bs.symmetric(v[1:], float(v[0]), (0.0, 1.0)) for k, v in found.items()}, bs


def overall(rows: list[dict[str, Tensor]], n_down: list[int]) -> dict[str, Tensor]:
    """The findings over all pairs (as `run.findings`) from each pair's rates [R]: the mean
    pass-through over the pairs that have one, and the AND + OR and the specialised features
    over all alive down features (each pair's rate weighted by its alive down features)."""
    pt = torch.stack([r["pass_through"] for r in rows])  # [P, R]
    defined = torch.isfinite(pt[:, 0])
    nan = torch.full_like(pt[0], math.nan)
    w = torch.tensor(n_down, dtype=F64)[:, None]
    pooled = lambda x: (x.nan_to_num(0.0) * w).sum(0) / w.sum() if w.sum() > 0 else nan
    boolean = torch.stack([r["and_rate"] + r["or_rate"] for r in rows])
    return {
        "pass_through_mean": pt[defined].mean(0) if defined.any() else nan,
        "boolean_fraction": pooled(boolean),
        "specialised_fraction": pooled(torch.stack([r["specialised"] for r in rows])),
    }


def _measures(sums: Tensor, w: ContextWeights) -> tuple[Tensor, Tensor, Tensor]:
    """`resampled_measures` in blocks of 1,024 pairs (memory: rows x pairs floats)."""
    blocks = [
        resampled_measures(sums[:, :, e : e + 1024], w) for e in range(0, sums.shape[2], 1024)
    ]
    rows = w.sums(sums[-1, :, :1]).shape[0]
    pearson, suf, nec = (
        torch.cat([m[q] for m in blocks], 1) if blocks else torch.zeros(rows, 0, dtype=F64)
        for q in range(3)
    )
    return pearson, suf, nec
