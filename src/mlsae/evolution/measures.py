"""Features across layers (SPEC section 6, seed 004): exact streaming statistics between the
SAEs of adjacent layers, from their sparse TopK codes only (no dense token x feature store).

For SAEs at layers u (up) and d (down), over the same N used tokens, with a[t,i] >= 0 the
activation of up feature i (0 when not in the top k) and b[t,j] that of down feature j:
  pearson[i,j]  = cov(a_i, b_j) / (sd(a_i) sd(b_j))             (all N tokens, zeros included)
  active_i(t)   = a[t,i] > 0.2 * max_t a[t,i]                   (max over the same data)
  jaccard[i,j]  = |A_i & B_j| / |A_i | B_j|
  sufficiency   = P(B_j | A_i) = |A_i & B_j| / |A_i|            (up active => down active)
  necessity     = P(A_i | B_j) = |A_i & B_j| / |B_j|            (down active => up active)
  decoder_cos   = cos(W_dec_u[i], W_dec_d[j])
Pass 1 (`FeatureStats`, in evolution_stats.py) gives per feature the sums, max, activity counts and top contexts;
pass 2 (`PairStats`) accumulates sum_t a_i b_j (float64) and |A_i & B_j| (int32) per pair as
dense [d_up, d_down] matrices filled by index_add over the k x k code products of each token,
so memory is 12 bytes per feature pair; pairs are processed in groups under a budget.
`summarize_pair` then reduces a pair in row blocks to: each feature's top-m partners (edges
carrying every measure), best partners, pass-through / appear / disappear, quasi-boolean AND /
OR (exactly two up features of necessity / sufficiency >= 0.999), and specialisation.
Dead features (never > 0 on the data) are excluded from every fraction and counted.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import MEASURES, EvolutionConfig
from mlsae.evolution.stats import F64, FeatureStats, PairStats
from mlsae.evolution.summary import PairSummary


def _terms(s: FeatureStats, counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per feature [d]: mean, 1/sd and |active|, 1/|active| (float64; the inverses are NaN
    where sd or |active| is 0, so undefined measures come out NaN)."""
    n = max(s.n, 1)
    mu = s.sum / n
    sd = (s.sumsq / n - mu * mu).clamp_min(0).sqrt()
    cnt = counts.to(F64)
    return (mu, torch.where(sd > 0, 1 / sd, math.nan), cnt, torch.where(cnt > 0, 1 / cnt, math.nan))


def _unit_rows(w: Tensor | None) -> Tensor | None:
    """Decoder rows scaled to unit norm (float64), None passes through."""
    return None if w is None else torch.nn.functional.normalize(w.detach().to(F64), dim=1)


def measures(
    up: FeatureStats,
    down: FeatureStats,
    pair: PairStats,
    rows: Tensor | slice,
    cols: Tensor | None = None,
    w_up: Tensor | None = None,
    w_down: Tensor | None = None,
    names: Collection[str] = MEASURES,
) -> dict[str, Tensor]:
    """The measures `names` (default all) at (rows, cols): two broadcastable index tensors (e.g. [E] and [E], or
    [b,1] and [1,d]), or a slice of rows against every column (a dense block, no gather).

    NaN where undefined (a dead feature); decoder_cos NaN without decoder rows.
    w_up / w_down: unit decoder rows [d, d_in] (see `_unit_rows`)."""
    cross, co = pair.matrices()
    ta, tb = _terms(up, pair.n_up), _terms(down, pair.n_down)
    if isinstance(rows, slice):
        c, cnt = cross[rows], co[rows].to(F64)  # [b, d_down]
        ta = tuple(t[rows, None] for t in ta)
        tb = tuple(t[None, :] for t in tb)
        cos = None
        if w_up is not None and w_down is not None and "decoder_cos" in names:
            cos = (w_up[rows].float() @ w_down.T.float()).to(F64)  # fp32: 1e-7 is plenty
    else:
        c, cnt = cross[rows, cols], co[rows, cols].to(F64)
        ta, tb = tuple(t[rows] for t in ta), tuple(t[cols] for t in tb)
        cos = None if w_up is None or w_down is None else (w_up[rows] * w_down[cols]).sum(-1)
    (mu_a, isd_a, na, ina), (mu_b, isd_b, nb, inb) = ta, tb
    pearson = c / max(up.n, 1)
    pearson -= mu_a * mu_b  # covariance
    pearson *= isd_a
    pearson *= isd_b
    out = {"pearson": pearson.clamp_(-1, 1), "sufficiency": cnt * ina, "necessity": cnt * inb}
    if "jaccard" in names:
        union = na + nb
        union -= cnt
        out["jaccard"] = (cnt / union).nan_to_num_(0.0)  # 0 / 0 only if both never active
    if "decoder_cos" in names:
        out["decoder_cos"] = torch.full_like(pearson, math.nan) if cos is None else cos
    return {k: out[k] for k in MEASURES if k in out}


@dataclass
class PairResult:
    """The reduction of one adjacent pair (up layer, down layer)."""

    up_layer: int
    down_layer: int
    edges: dict[str, Tensor]  # up, down (i64 [E]) + every measure (f64 [E])
    best_next: Tensor  # [d_up] best next-layer Pearson (NaN: dead)
    best_next_idx: Tensor  # [d_up]
    best_prev: Tensor  # [d_down] best previous-layer Pearson (NaN: dead)
    best_prev_idx: Tensor  # [d_down]
    and_features: list[tuple[int, int, int]] = field(default_factory=list)  # (down, up1, up2)
    or_features: list[tuple[int, int, int]] = field(default_factory=list)
    specialised: list[tuple[int, int]] = field(default_factory=list)  # (down, parent up)
    summary: PairSummary | None = None


def _fill_members(store: Tensor, count: Tensor, hits: Tensor, offset: int) -> None:
    """Record the first two row indices (+offset) per column of a boolean block [b, d]."""
    r, c = hits.nonzero(as_tuple=True)  # row-major: rows ascending within a column
    if len(c) == 0:
        return
    order = torch.argsort(c, stable=True)
    r, c = r[order], c[order]
    rank = torch.arange(len(c)) - torch.searchsorted(c, c, side="left") + count[c]
    keep = rank < store.shape[1]
    store[c[keep], rank[keep]] = r[keep] + offset
    count += hits.sum(0)


@dataclass
class _Scan:
    """The running reductions of `summarize_pair` over row blocks of a pair."""

    d_up: int
    d_dn: int
    m: int  # top-m partners per up feature (0: threshold-only)
    mc: int  # top-m partners per down feature
    best_next: Tensor = field(init=False)
    best_next_idx: Tensor = field(init=False)
    best_prev: Tensor = field(init=False)
    best_prev_idx: Tensor = field(init=False)
    col_val: Tensor = field(init=False)  # [mc, d_dn] running top-m per column
    col_idx: Tensor = field(init=False)
    and_cnt: Tensor = field(init=False)
    or_cnt: Tensor = field(init=False)
    and_mem: Tensor = field(init=False)
    or_mem: Tensor = field(init=False)
    spec_nec: Tensor = field(init=False)
    spec_suf: Tensor = field(init=False)
    spec_par: Tensor = field(init=False)
    cand_i: list[Tensor] = field(default_factory=list)
    cand_j: list[Tensor] = field(default_factory=list)
    cand_v: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        d_up, d_dn, i64 = self.d_up, self.d_dn, torch.int64
        self.best_next = torch.full((d_up,), math.nan, dtype=F64)
        self.best_next_idx = torch.full((d_up,), -1, dtype=i64)
        self.best_prev = torch.full((d_dn,), -math.inf, dtype=F64)
        self.best_prev_idx = torch.full((d_dn,), -1, dtype=i64)
        self.col_val = torch.full((self.mc, d_dn), -math.inf, dtype=F64)
        self.col_idx = torch.full((self.mc, d_dn), -1, dtype=i64)
        self.and_cnt, self.or_cnt = torch.zeros(d_dn, dtype=i64), torch.zeros(d_dn, dtype=i64)
        self.and_mem = torch.full((d_dn, 2), -1, dtype=i64)
        self.or_mem = torch.full((d_dn, 2), -1, dtype=i64)
        self.spec_nec = torch.full((d_dn,), -math.inf, dtype=F64)
        self.spec_suf = torch.full((d_dn,), math.nan, dtype=F64)
        self.spec_par = torch.full((d_dn,), -1, dtype=i64)

    def boolean(
        self, nec: Tensor, suf: Tensor, nosup_r: Tensor, sup_dn: Tensor, s: int, threshold: float
    ) -> None:
        """Quasi-boolean AND / OR members (features under min_support left out) and each down
        feature's most necessary parent (specialisation)."""
        for hits, mem, cnt in (
            (nec >= threshold, self.and_mem, self.and_cnt),
            (suf >= threshold, self.or_mem, self.or_cnt),
        ):
            hits[nosup_r] = False
            hits &= sup_dn[None, :]
            _fill_members(mem, cnt, hits, s)
        n2 = nec.nan_to_num(nan=-math.inf)
        n2[nosup_r] = -math.inf
        n2[:, ~sup_dn] = -math.inf
        v, i = n2.max(0)
        better = v > self.spec_nec
        self.spec_nec[better], self.spec_par[better] = v[better], i[better] + s
        self.spec_suf[better] = suf[i[better], better.nonzero(as_tuple=True)[0]]

    def partners(self, pearson: Tensor, rows: Tensor, s: int) -> None:
        """Best partners by Pearson (NaN for dead features); `pearson` is modified."""
        p = pearson.nan_to_num_(nan=-math.inf)
        v, j = p.max(1)
        self.best_next[rows] = torch.where(v > -math.inf, v, math.nan)
        self.best_next_idx[rows] = j
        v, i = p.max(0)
        better = v > self.best_prev
        self.best_prev[better], self.best_prev_idx[better] = v[better], i[better] + s

    def candidates(self, e: Tensor, rows: Tensor, s: int, max_edges: int) -> None:
        """Edge candidates from the edge measure block `e` (-inf where excluded)."""
        if self.m:
            v, j = e.topk(self.m, dim=1)
            ok = v > -math.inf
            self.cand_i.append(rows[:, None].expand_as(j)[ok])
            self.cand_j.append(j[ok])
            self.cand_v.append(v[ok])
            v, i = e.T.topk(min(self.mc, len(rows)), dim=1)  # [d_dn, <=mc] per column
            self.col_val, sel = torch.cat([self.col_val, v.T]).topk(self.mc, dim=0)
            self.col_idx = torch.cat([self.col_idx, i.T + s]).gather(0, sel)
            return
        ii, jj = (e > -math.inf).nonzero(as_tuple=True)
        self.cand_i.append(rows[ii])
        self.cand_j.append(jj)
        self.cand_v.append(e[ii, jj])
        if sum(len(x) for x in self.cand_v) > 2 * max_edges:
            keep = torch.cat(self.cand_v).topk(max_edges).indices
            self.cand_i, self.cand_j, self.cand_v = (
                [torch.cat(x)[keep]] for x in (self.cand_i, self.cand_j, self.cand_v)
            )

    def edges(self, max_edges: int, top_m: int) -> tuple[Tensor, Tensor]:
        """The sorted, de-duplicated edge endpoints (up, down) from the candidates."""
        if self.m:
            ok = self.col_val > -math.inf
            self.cand_i.append(self.col_idx[ok])
            self.cand_j.append(torch.arange(self.d_dn)[None, :].expand_as(self.col_idx)[ok])
        ei, ej = torch.cat(self.cand_i), torch.cat(self.cand_j)
        if top_m == 0 and len(ei) > max_edges:
            keep = torch.cat(self.cand_v).topk(max_edges).indices
            ei, ej = ei[keep], ej[keep]
        key = torch.unique(ei * self.d_dn + ej)  # sorted, de-duplicated
        return key // self.d_dn, key % self.d_dn


def summarize_pair(
    up: FeatureStats,
    down: FeatureStats,
    pair: PairStats,
    cfg: EvolutionConfig,
    w_up: Tensor | None = None,
    w_down: Tensor | None = None,
    layers: tuple[int, int] = (0, 1),
    block_entries: int = 1 << 21,
) -> PairResult:
    """Reduce a pair's accumulators (row blocks, bounded memory) to edges and counts.
    w_up / w_down: raw decoder weights [d_sae, d_in] (rows are features)."""
    wu, wd = _unit_rows(w_up), _unit_rows(w_down)
    d_up, d_dn = pair.d_up, pair.d_down
    sup_up = up.alive & (pair.n_up >= cfg.min_support)
    sup_dn = down.alive & (pair.n_down >= cfg.min_support)
    scan = _Scan(d_up, d_dn, min(cfg.top_m, d_dn), min(cfg.top_m, d_up))
    step = max(1, block_entries // max(d_dn, 1))
    need = {"pearson", "necessity", "sufficiency", cfg.edge_measure}
    col_bias = torch.where(down.alive, 0.0, -math.inf).to(F64)  # -inf at dead columns
    for s in range(0, d_up, step):
        rows = torch.arange(s, min(s + step, d_up))
        ms = measures(up, down, pair, slice(s, s + len(rows)), None, wu, wd, need)
        scan.boolean(
            ms["necessity"], ms["sufficiency"], ~sup_up[rows], sup_dn, s, cfg.boolean_threshold
        )
        scan.partners(ms["pearson"], rows, s)
        e = ms[cfg.edge_measure].nan_to_num_(nan=-math.inf)  # may modify the measure in place
        e[~up.alive[rows]] = -math.inf
        e += col_bias
        e[e <= 0] = -math.inf
        if cfg.edge_threshold is not None:
            e[e < cfg.edge_threshold] = -math.inf
        scan.candidates(e, rows, s, cfg.max_edges_per_pair)
    ei, ej = scan.edges(cfg.max_edges_per_pair, cfg.top_m)
    spec_ok = (
        sup_dn
        & (scan.spec_nec >= cfg.specialise_necessity)
        & (scan.spec_suf <= cfg.specialise_sufficiency)
    )
    res = PairResult(
        up_layer=layers[0],
        down_layer=layers[1],
        edges={"up": ei, "down": ej, **measures(up, down, pair, ei, ej, wu, wd)},
        best_next=scan.best_next,
        best_next_idx=scan.best_next_idx,
        best_prev=torch.where(scan.best_prev > -math.inf, scan.best_prev, math.nan),
        best_prev_idx=scan.best_prev_idx,
        and_features=_boolean(
            up, down, pair, cfg, scan.and_mem, (scan.and_cnt == 2) & sup_dn, "and"
        ),
        or_features=_boolean(up, down, pair, cfg, scan.or_mem, (scan.or_cnt == 2) & sup_dn, "or"),
        specialised=[(int(j), int(scan.spec_par[j])) for j in spec_ok.nonzero()],
    )
    res.summary = pair_summary(res, up.alive, down.alive, cfg, (sup_up, sup_dn))
    return res


def _boolean(
    up: FeatureStats,
    down: FeatureStats,
    pair: PairStats,
    cfg: EvolutionConfig,
    mem: Tensor,
    ok: Tensor,
    kind: str,
) -> list[tuple[int, int, int]]:
    """(down, up 1, up 2) of the AND / OR candidates `ok` (exactly two parents). With
    `cfg.boolean_exclusive` a candidate must also be a combination, not a copy: for an OR
    neither parent alone covers the child (each necessity < t) and the two together do
    (necessity 1 + necessity 2 >= t, the bound of P(A1 or A2 | B) from pair counts, exact when
    the parents never fire together); for an AND neither parent alone implies the child (each
    sufficiency < t)."""
    j = ok.nonzero().flatten()
    rows = [(int(a), int(mem[a, 0]), int(mem[a, 1])) for a in j]
    if not cfg.boolean_exclusive or not rows:
        return rows
    t = cfg.boolean_threshold
    m = [measures(up, down, pair, mem[j, c], j, names=()) for c in (0, 1)]
    if kind == "or":
        nec1, nec2 = m[0]["necessity"], m[1]["necessity"]
        keep = (nec1 < t) & (nec2 < t) & (nec1 + nec2 >= t)
    else:
        keep = (m[0]["sufficiency"] < t) & (m[1]["sufficiency"] < t)
    return [r for r, k in zip(rows, keep.tolist(), strict=True) if k]


def pair_summary(
    r: PairResult,
    alive_up: Tensor,
    alive_dn: Tensor,
    cfg: EvolutionConfig,
    supported: tuple[Tensor, Tensor] | None = None,
) -> PairSummary:
    """Fractions over alive features; dead ones counted."""
    nu, nd = int(alive_up.sum()), int(alive_dn.sum())
    bn = r.best_next[alive_up].nan_to_num(-math.inf)
    bp = r.best_prev[alive_dn].nan_to_num(-math.inf)
    frac = lambda x, n: float(x) / n if n else None
    return PairSummary(
        up_layer=r.up_layer,
        down_layer=r.down_layer,
        alive_up=nu,
        dead_up=int((~alive_up).sum()),
        alive_down=nd,
        dead_down=int((~alive_dn).sum()),
        pass_through=frac((bn >= cfg.pass_through).sum(), nu),
        disappear=frac((bn < cfg.link_threshold).sum(), nu),
        appear=frac((bp < cfg.link_threshold).sum(), nd),
        n_and=len(r.and_features),
        n_or=len(r.or_features),
        n_specialised=len(r.specialised),
        specialised=frac(len(r.specialised), nd),
        n_edges=len(r.edges["up"]),
        and_features=list(r.and_features),
        or_features=list(r.or_features),
        specialised_features=list(r.specialised),
        n_supported_up=None if supported is None else int(supported[0].sum()),
        n_supported_down=None if supported is None else int(supported[1].sum()),
    )


def plan_groups(sizes: list[tuple[int, int]], memory_gb: float) -> list[list[int]]:
    """Split pair indices into consecutive groups whose accumulators fit the budget."""
    budget = memory_gb * 1e9
    groups: list[list[int]] = []
    used = 0.0
    for p, (du, dd) in enumerate(sizes):
        need = PairStats.nbytes(du, dd)
        if need > budget:
            raise MlsaeError(
                f"one layer pair needs {need / 1e9:.2f} GB of co-moment matrices, more than "
                f"--memory-gb {memory_gb:g}: raise --memory-gb"
            )
        if not groups or used + need > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(p)
        used += need
    return groups
