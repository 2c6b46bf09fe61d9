"""`mlsae synth score RUN --truth DIR [--evolution EVO]`: every measure against the truth
(SPEC 7 "Synthetic ground truth").

Dictionary (per layer l, over the true features living at l): cos[j,f] = |cosine| between
decoder row j and feature f's direction at l (in the space the SAE reads: with per-vector
standardisation, the directions' mean over dimensions is removed first). recovery = mean over f
of max_j cos (SPEC 7); recovered = the fraction of f with max_j cos >= --recovered-cos; MCC =
the mean of cos over the optimal one-to-one matching (scipy linear_sum_assignment; a feature
left unmatched counts 0). An MLSAE has one dictionary for every layer; a per-layer set, one per
layer.

Spans (an MLSAE): the SAE runs on the truth's test cache (`analysis.layers`); each true feature
is matched one-to-one to a latent by its best |cosine| over the layers of its span; Spearman
of the measured E[L|J] vs the true E[L|F], and of the measured span (layers with
P(L=l|J) >= --span-share) vs the true span length; the multi-layer fractions and both
variance-ratio pairs (SPEC's and the paper code's) measured vs true.

Edges (a per-layer set and its `mlsae evolution` output): true features are matched to each
layer's latents as above; a true edge is recovered when evolution reports it between the
matched latents (pass-through: the up latent's best next-layer Pearson partner, from graph.json,
is the matched down latent and >= the pass-through threshold; AND / OR: the same two up
latents; specialisation: the same parent). Precision = reported edges that are true / reported.
SAE Match: the fraction of true pass-through pairs whose matched latents its permutation maps
onto each other, and the median decoder cosine of its matched pairs (the drift it sees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr
from torch import Tensor

from mlsae.analysis.layers import LayerStatsResult
from mlsae.core.errors import MlsaeError
from mlsae.evolution.graphfile import GraphFile
from mlsae.evolution.summary import EvolutionSummary
from mlsae.synth.truth import Truth


@dataclass
class Recovery:
    """Dictionary recovery at one layer."""

    layer: int
    n_true: int
    mcc: float
    recovery: float
    recovered: float
    match: dict[int, int] = field(default_factory=dict, repr=False)  # feature -> latent


@dataclass
class EdgeScore:
    """One relation kind: true edges, reported edges, hits."""

    kind: str
    n_true: int
    n_reported: int
    n_hit_true: int
    n_hit_reported: int
    recall: float | None
    precision: float | None


@dataclass
class SpanScore:
    """Where the MLSAE's matched latents live vs the truth."""

    n_matched: int
    expected_layer_spearman: float
    span_spearman: float
    measured_vs_true: dict[str, list[float | None]]


@dataclass
class MatchScore:
    """SAE Match's permutations vs the true pass-through pairs."""

    accuracy: float | None
    n_true: int
    median_matched_cos: list[float]
    median_matched_cos_alive: list[float] = field(default_factory=list)
    """The same over pairs of alive latents (nodes of evolution's graph), per pair."""


def unit(w: Tensor, centre: bool = False) -> Tensor:
    """Rows scaled to unit norm (float64); `centre`: each row's mean over dimensions removed."""
    w = w.detach().to(torch.float64)
    if centre:
        w = w - w.mean(-1, keepdim=True)
    return torch.nn.functional.normalize(w, dim=-1)


def match(cos: np.ndarray) -> tuple[float, dict[int, int]]:
    """Optimal one-to-one matching of true features (columns) to latents (rows) maximising the
    summed |cosine| `cos` [n_latents, n_true]: (MCC over the true features, {feature: latent})."""
    rows, cols = linear_sum_assignment(cos, maximize=True)
    n_true = cos.shape[1]
    mcc = float(cos[rows, cols].sum() / n_true) if n_true else math.nan
    return mcc, {int(c): int(r) for r, c in zip(rows, cols, strict=True)}


def recovery_at(
    w_dec: Tensor, truth: Truth, layer: int, centre: bool, threshold: float
) -> Recovery:
    """Decoder rows [d_sae, d] against the features living at `layer`."""
    feats = truth.in_span()[:, layer].nonzero().flatten()
    t = unit(truth.directions[feats, layer], centre)
    cos = (unit(w_dec) @ t.T).abs().numpy()  # [d_sae, n]
    mcc, m = match(cos)
    best = cos.max(0) if cos.size else np.zeros(0)
    return Recovery(
        layer=layer,
        n_true=len(feats),
        mcc=mcc,
        recovery=float(best.mean()) if len(feats) else math.nan,
        recovered=float((best >= threshold).mean()) if len(feats) else math.nan,
        match={int(feats[c]): j for c, j in m.items()},
    )


def span_match(w_dec: Tensor, truth: Truth, centre: bool) -> tuple[np.ndarray, dict[int, int]]:
    """Match every true feature to one latent of a multi-layer dictionary by its best |cosine|
    over the layers of its span: (cos [d_sae, F], {feature: latent})."""
    span = truth.in_span()  # [F, L]
    w = unit(w_dec)
    best = torch.zeros(w.shape[0], truth.n_features, dtype=torch.float64)
    for ly in range(truth.cfg.n_layers):
        c = (w @ unit(truth.directions[:, ly], centre).T).abs()
        best = torch.maximum(best, torch.where(span[:, ly][None, :], c, 0.0))
    cos = best.numpy()
    return cos, match(cos)[1]


def _spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)  # type: ignore[attr-defined]


def span_score(
    stats: LayerStatsResult,
    truth: Truth,
    true_stats: dict[str, Any],
    m: dict[int, int],
    share: float,
) -> SpanScore:
    """`stats`: the MLSAE's layer statistics on the test cache; `true_stats`: truth.json's
    body of the test split (raw JSON, read here)."""
    from mlsae.analysis.summary import LayerSummary
    from mlsae.core.schema import from_dict

    alive = stats.latent_mass > 0
    pairs = [(f, j) for f, j in m.items() if alive[j]]
    true_e = true_stats["expected_layer"]
    e_meas = [float(stats.expected_layer[j]) for _, j in pairs]
    e_true = [float(true_e[f]) for f, _ in pairs]
    s_meas = [float((stats.p_layer_given_latent[j] >= share).sum()) for _, j in pairs]
    s_true = [float(truth.last[f] - truth.first[f] + 1) for f, _ in pairs]
    ts = from_dict(LayerSummary, true_stats["layer_stats"], "truth.json layer_stats")
    ms = LayerSummary.of(stats)
    names = (
        "rel_var_latent",
        "rel_var_token",
        "multi_layer_fraction_aggregate",
        "multi_layer_fraction_token",
        "multi_layer_fraction_token_per_latent",
    )
    both: dict[str, list[float | None]] = {k: [getattr(ms, k), getattr(ts, k)] for k in names}
    for k in ("rel_var_latent", "rel_var_token"):
        papers = (ms.paper_formula, ts.paper_formula)
        both[f"paper_{k}"] = [None if p is None else getattr(p, k) for p in papers]
    return SpanScore(
        n_matched=len(pairs),
        expected_layer_spearman=_spearman(e_meas, e_true),
        span_spearman=_spearman(s_meas, s_true),
        measured_vs_true=both,
    )


def _pr(kind: str, true: set, reported: set) -> EdgeScore:
    """Precision / recall of a set of reported edges against the true ones."""
    hit = true & reported
    return EdgeScore(
        kind=kind,
        n_true=len(true),
        n_reported=len(reported),
        n_hit_true=len(hit),
        n_hit_reported=len(hit),
        recall=len(hit) / len(true) if true else None,
        precision=len(hit) / len(reported) if reported else None,
    )


def true_edges(truth: Truth, rec: dict[int, Recovery]) -> dict[str, set]:
    """The truth's edges in latent indices (per-layer matches): pass_through (l, up, down),
    and / or (l, down, frozenset(up1, up2)), specialised (l, down, up)."""
    e = truth.edges()
    out: dict[str, set] = {k: set() for k in e}
    for ly, f in e["pass_through"]:
        out["pass_through"].add((ly, rec[ly].match.get(f), rec[ly + 1].match.get(f)))
    for kind in ("and", "or"):
        for ly, c, p1, p2 in e[kind]:
            ups = frozenset((rec[ly].match.get(p1), rec[ly].match.get(p2)))
            out[kind].add((ly, rec[ly + 1].match.get(c), ups))
    for ly, c, p in e["specialised"]:
        out["specialised"].add((ly, rec[ly + 1].match.get(c), rec[ly].match.get(p)))
    return out


def reported_edges(evo: EvolutionSummary, graph: GraphFile) -> dict[str, set]:
    """The edges an `mlsae evolution` output reports, in the same form as `true_edges`."""
    s = evo.settings
    if s.edge_measure != "pearson" or (s.edge_threshold or 0) > s.pass_through:
        raise MlsaeError(
            "score needs an evolution output made with --edge-measure pearson and "
            "no --edge-threshold above --pass-through"
        )
    out: dict[str, set] = {"pass_through": set(), "and": set(), "or": set(), "specialised": set()}
    pearson = graph.measures["pearson"]  # NaN where graph.json holds null
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for a, b, p in zip(graph.src.tolist(), graph.dst.tolist(), pearson.tolist(), strict=True):
        key = (int(graph.layer[a]), int(graph.feature[a]))
        if not math.isnan(p) and (key not in best or p > best[key][0]):
            best[key] = (p, int(graph.feature[b]))
    for (ly, up), (p, down) in best.items():
        if p >= s.pass_through:
            out["pass_through"].add((ly, up, down))
    for pair in evo.pairs:
        ly = pair.up_layer
        for kind, rows in (("and", pair.and_features), ("or", pair.or_features)):
            for down, u1, u2 in rows:
                out[kind].add((ly, down, frozenset((u1, u2))))
        for down, up in pair.specialised_features:
            out["specialised"].add((ly, down, up))
    return out


def edge_scores(true: dict[str, set], reported: dict[str, set]) -> list[EdgeScore]:
    return [_pr(k, true[k], reported[k]) for k in ("pass_through", "and", "or", "specialised")]


def matched_cosines(
    w_up: Tensor, w_down: Tensor, alive_up: Tensor | None = None, alive_down: Tensor | None = None
) -> Tensor:
    """Decoder cosines of SAE Match's matched pairs (evolution.match) between two SAEs, only
    pairs whose both latents are alive (bool [d_sae] masks; None: all): the drift it sees."""
    from mlsae.evolution.match import folded_decoder, match_permutation

    perm = match_permutation(w_up, w_down)
    ok = perm >= 0
    if alive_up is not None and alive_down is not None:
        ok &= alive_up & alive_down[perm.clamp_min(0)]
    u, v = folded_decoder(w_up), folded_decoder(w_down)
    return (u[ok] * v[perm[ok]]).sum(-1)


def alive_from_graph(graph: GraphFile, layer: int, d_sae: int) -> Tensor:
    """bool [d_sae]: the latents of `layer` that are nodes of an evolution graph.json (alive)."""
    out = torch.zeros(d_sae, dtype=torch.bool)
    for ly, f in zip(graph.layer.tolist(), graph.feature.tolist(), strict=True):
        if ly == layer:
            out[f] = True
    return out


def match_score(w_decs: list[Tensor], truth: Truth, rec: dict[int, Recovery]) -> MatchScore:
    """SAE Match (evolution.match) between adjacent per-layer SAEs vs the true pass-through."""
    from mlsae.evolution.match import folded_decoder, match_permutation

    hits = n = 0
    med: list[float] = []
    pt = truth.edges()["pass_through"]
    for ly in range(len(w_decs) - 1):
        perm = match_permutation(w_decs[ly], w_decs[ly + 1])
        u, v = folded_decoder(w_decs[ly]), folded_decoder(w_decs[ly + 1])
        ok = perm >= 0
        med.append(float((u[ok] * v[perm[ok]]).sum(-1).median()))
        for lf, f in pt:
            if lf == ly:
                up, down = rec[ly].match.get(f), rec[ly + 1].match.get(f)
                n += 1
                hits += int(up is not None and down is not None and int(perm[up]) == down)
    return MatchScore(accuracy=hits / n if n else None, n_true=n, median_matched_cos=med)
