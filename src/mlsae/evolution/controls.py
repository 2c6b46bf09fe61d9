"""Controls for the cross-layer measures of `mlsae evolution` (issue 24 item 3): the same
measures between SAEs where the answer is known to be high or low, next to the observed one.

For an up layer l of a per-layer set, on the held-out tokens of an activation cache:
  observed    (l, l+1): the adjacent pair, as `mlsae evolution` measures it;
  seed        (l, l): the SAE of block l against a second SAE of block l trained with another
              seed, both reading the same vectors (the ceiling: what "the same feature" gives);
  perm_context (l, l+1) with layer l+1's tokens permuted within each context (a null that
              keeps each context's topic; the measures' token alignment is broken);
  perm_global (l, l+1) with layer l+1's tokens permuted over the whole stream;
  gap_g       (l, l+g): non-adjacent blocks (a null for "adjacent blocks are special").
Each row gets the measures of `summarize_pair` (pass-through at Pearson >= pass_through,
appear / disappear at link_threshold), the distribution of the best-partner Pearson, and the
decoder cosine of each up feature with its best-Pearson partner. Intervals: a bootstrap over
contexts (core.bootstrap; the symmetric interval about the full-data rate) of the rates with
each feature's best partner fixed at its full-data choice (so the interval is conditional on
the partner choice).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource
from mlsae.core.bootstrap import Bootstrap, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.stage_config import ControlsConfig, EvolutionConfig
from mlsae.evolution.codes import comparable_acts, load_per_layer, source_chunks
from mlsae.evolution.measures import PairResult, summarize_pair
from mlsae.evolution.stats import FeatureStats, PairStats
from mlsae.sae.autoencoder import SparseAutoencoder

F64 = torch.float64


@dataclass
class LayerCodes:
    """One SAE's TopK codes of the N used tokens of a stream (cross-layer-comparable acts)."""

    layer: int
    idx: Tensor  # [N, k] int64
    acts: Tensor  # [N, k] float32
    w_dec: Tensor  # [d_sae, d_in] the SAE's decoder
    d_sae: int

    def permuted(self, order: Tensor) -> LayerCodes:
        """The codes with token t taken from token order[t]."""
        return LayerCodes(self.layer, self.idx[order], self.acts[order], self.w_dec, self.d_sae)

    def dense(self, rows: Tensor) -> Tensor:
        """[len(rows), d_sae] float64 activations of some tokens (0 off the code)."""
        out = torch.zeros(len(rows), self.d_sae, dtype=F64)
        out.scatter_(1, self.idx[rows], self.acts[rows].to(F64))
        return out


@torch.inference_mode()
def encode_stream(
    source: ActivationSource,
    saes: list[tuple[int, SparseAutoencoder]],
    rescale: bool,
    max_tokens: int | None = None,
) -> tuple[list[LayerCodes], Tensor]:
    """Every SAE's codes of its layer's used tokens, in stream order, and each token's context
    index [N]. Several SAEs may read the same layer."""
    chunks, _ = source_chunks(source, saes, max_tokens)
    idx: list[list[Tensor]] = [[] for _ in saes]
    acts: list[list[Tensor]] = [[] for _ in saes]
    ctx: list[Tensor] = []
    length = max(1, int(source.context_length))
    for ch in chunks:
        used = ch.mask
        ctx.append(((ch.offset + torch.arange(len(used))) // length)[used])
        for p, (_, sae) in enumerate(saes):
            enc = sae.encode(ch.acts[:, p][used].float())
            idx[p].append(enc.top_indices.long().cpu())
            acts[p].append(comparable_acts(enc, rescale).float().cpu())
    if not ctx or sum(len(c) for c in ctx) == 0:
        raise MlsaeError(f"{source.describe()}: no used (non-special) tokens to analyse")
    codes = [
        LayerCodes(ly, torch.cat(i), torch.cat(a), sae.W_dec.detach().float().cpu(), sae.cfg.d_sae)
        for (ly, sae), i, a in zip(saes, idx, acts, strict=True)
    ]
    return codes, torch.cat(ctx)


def permutation(ctx: Tensor, within_context: bool, seed: int) -> Tensor:
    """A random order of the N tokens [N] int64: within each context (token t only swaps with
    tokens of its own context) or global."""
    gen = torch.Generator().manual_seed(seed)
    n = len(ctx)
    if not within_context:
        return torch.randperm(n, generator=gen)
    order = torch.arange(n)
    for c in torch.unique(ctx):
        rows = (ctx == c).nonzero(as_tuple=True)[0]
        order[rows] = rows[torch.randperm(len(rows), generator=gen)]
    return order


def pair_result(
    up: LayerCodes, down: LayerCodes, cfg: EvolutionConfig
) -> tuple[PairResult, FeatureStats, FeatureStats, PairStats]:
    """`summarize_pair` of two code sets of the same N tokens (passes 1 and 2 in memory)."""
    fa, fb = FeatureStats(up.d_sae, 0), FeatureStats(down.d_sae, 0)
    fa.update(up.idx, up.acts)
    fb.update(down.idx, down.acts)
    ps = PairStats(fa.threshold(cfg.active_fraction), fb.threshold(cfg.active_fraction))
    step = 2048
    for s in range(0, len(up.idx), step):
        ps.update(
            up.idx[s : s + step],
            up.acts[s : s + step],
            down.idx[s : s + step],
            down.acts[s : s + step],
        )
    res = summarize_pair(fa, fb, ps, cfg, up.w_dec, down.w_dec, (up.layer, down.layer))
    return res, fa, fb, ps


def partner_sums(a: LayerCodes, b: LayerCodes, partner: Tensor, ctx: Tensor) -> Tensor:
    """Per context c and up feature i, the sums over c's tokens of (1, a_i, a_i^2, b_p, b_p^2,
    a_i b_p) with p = partner[i] (-1: none, b_p = 0): [C, d_up, 6] float64."""
    contexts = torch.unique(ctx)
    out = torch.zeros(len(contexts), a.d_sae, 6, dtype=F64)
    safe = partner.clamp_min(0)
    for c_i, c in enumerate(contexts):
        rows = (ctx == c).nonzero(as_tuple=True)[0]
        x = a.dense(rows)  # [n, d_up]
        y = b.dense(rows)[:, safe] * (partner >= 0)  # [n, d_up]: each feature's partner
        out[c_i, :, 0] = len(rows)
        out[c_i, :, 1], out[c_i, :, 2] = x.sum(0), (x * x).sum(0)
        out[c_i, :, 3], out[c_i, :, 4] = y.sum(0), (y * y).sum(0)
        out[c_i, :, 5] = (x * y).sum(0)
    return out


def pearson_from_sums(s: Tensor) -> Tensor:
    """[..., 6] sums (n, sx, sxx, sy, syy, sxy) -> Pearson [...] (NaN where a sd is 0)."""
    n = s[..., 0].clamp_min(1)
    mx, my = s[..., 1] / n, s[..., 3] / n
    vx = (s[..., 2] / n - mx * mx).clamp_min(0)
    vy = (s[..., 4] / n - my * my).clamp_min(0)
    cov = s[..., 5] / n - mx * my
    den = (vx * vy).sqrt()
    return torch.where(den > 0, cov / den.clamp_min(1e-300), math.nan).clamp(-1, 1)


def rate_intervals(
    sums: Tensor, alive: Tensor, cuts: dict[str, tuple[float, bool]], bs: Bootstrap
) -> dict[str, Interval | None]:
    """Bootstrap intervals of fractions of alive features whose fixed-partner Pearson is
    >= cut (True) or < cut (False); a NaN Pearson counts as below every cut. The symmetric
    interval about the full-data fraction (core.bootstrap: these threshold counts'
    resamples sit above their estimate)."""
    alive_sums = sums[:, alive]  # [C, n_alive, 6]

    def shares(resampled: Tensor) -> dict[str, Tensor]:
        """[R, n_alive, 6] resampled sums -> each fraction [R]."""
        r = pearson_from_sums(resampled).nan_to_num(-math.inf)
        return {
            name: (r >= cut if above else r < cut).double().mean(1)
            for name, (cut, above) in cuts.items()
        }

    values: dict[str, list[Tensor]] = {k: [] for k in cuts}
    flat = alive_sums.reshape(bs.n_contexts, -1)
    for s in range(0, bs.counts.shape[0], 100):
        part = shares((bs.counts[s : s + 100] @ flat).reshape(-1, *alive_sums.shape[1:]))
        for name, v in part.items():
            values[name].append(v)
    point = shares(bs.whole().sums(alive_sums))
    return {
        k: bs.symmetric(torch.cat(v), float(point[k][0]), (0.0, 1.0)) for k, v in values.items()
    }


@dataclass
class ControlRow:
    """The measures of one pair of code sets (a row of the controls table)."""

    kind: str  # observed, seed, perm_context, perm_global, gap_<g>
    up_layer: int
    down_layer: int
    n_tokens: int
    alive_up: int
    alive_down: int
    pass_through: float | None
    disappear: float | None
    appear: float | None
    best_pearson: dict[str, float]  # mean, p10, p50, p90 over alive up features
    matched_decoder_cos: dict[str, float]  # mean, p50 over alive up features' best partners
    intervals: dict[str, Interval | None] = field(default_factory=dict)


def _quantiles(x: Tensor, names: dict[str, float | None]) -> dict[str, float]:
    x = x[torch.isfinite(x)].double()
    if len(x) == 0:
        return {k: math.nan for k in names}
    return {
        k: float(x.mean()) if q is None else float(torch.quantile(x, q)) for k, q in names.items()
    }


def control_row(
    kind: str,
    up: LayerCodes,
    down: LayerCodes,
    ctx: Tensor,
    cfg: EvolutionConfig,
    bs: Bootstrap | None,
) -> ControlRow:
    """Measures of (up, down) over the same tokens; intervals when `bs` is given."""
    res, fa, fb, _ = pair_result(up, down, cfg)
    s = res.summary
    if s is None:
        raise MlsaeError(f"no summary for the pair ({up.layer}, {down.layer})")
    alive_up, alive_dn = fa.alive, fb.alive
    best = res.best_next[alive_up]
    wu = torch.nn.functional.normalize(up.w_dec.double(), dim=1)
    wd = torch.nn.functional.normalize(down.w_dec.double(), dim=1)
    idx = res.best_next_idx[alive_up]
    cos = (wu[alive_up] * wd[idx.clamp_min(0)]).sum(1)
    row = ControlRow(
        kind=kind,
        up_layer=up.layer,
        down_layer=down.layer,
        n_tokens=len(up.idx),
        alive_up=s.alive_up,
        alive_down=s.alive_down,
        pass_through=s.pass_through,
        disappear=s.disappear,
        appear=s.appear,
        best_pearson=_quantiles(best, {"mean": None, "p10": 0.1, "p50": 0.5, "p90": 0.9}),
        matched_decoder_cos=_quantiles(cos, {"mean": None, "p50": 0.5}),
    )
    if bs is not None:
        up_sums = partner_sums(up, down, res.best_next_idx.where(alive_up, -1), ctx)
        row.intervals = rate_intervals(
            up_sums,
            alive_up,
            {"pass_through": (cfg.pass_through, True), "disappear": (cfg.link_threshold, False)},
            bs,
        )
        dn_sums = partner_sums(down, up, res.best_prev_idx.where(alive_dn, -1), ctx)
        row.intervals |= rate_intervals(
            dn_sums, alive_dn, {"appear": (cfg.link_threshold, False)}, bs
        )
    return row


def control_rows(
    codes: dict[tuple[str, int], LayerCodes],
    ctx: Tensor,
    up_layers: list[int],
    cfg: EvolutionConfig,
    ctl: ControlsConfig,
) -> Iterator[ControlRow]:
    """Every control of every up layer l: codes[("main", l)] are the per-layer set's,
    codes[("seed", l)] the second seed's (optional)."""
    n_ctx = len(torch.unique(ctx))
    bs = Bootstrap(n_ctx, ctl.resamples, ctl.control_seed) if n_ctx >= 2 else None
    for lu in up_layers:
        up = codes[("main", lu)]
        nxt = codes.get(("main", lu + 1))
        if ("seed", lu) in codes:
            yield control_row("seed", up, codes[("seed", lu)], ctx, cfg, bs)
        if nxt is not None:
            yield control_row("observed", up, nxt, ctx, cfg, bs)
            for within, name in ((True, "perm_context"), (False, "perm_global")):
                order = permutation(ctx, within, ctl.control_seed + lu)
                yield control_row(name, up, nxt.permuted(order), ctx, cfg, bs)
        for g in ctl.gaps:
            if ("main", lu + g) in codes:
                yield control_row(f"gap_{g}", up, codes[("main", lu + g)], ctx, cfg, bs)


def verdict(observed: Interval | None, null: Interval | None) -> str:
    """'above' / 'below' the null when the intervals are apart, else 'inconclusive'."""
    if observed is None or null is None or observed.overlaps(null):
        return "inconclusive"
    return "above" if observed.low > null.high else "below"


def verdicts(rows: list[ControlRow], measure: str = "pass_through") -> list[dict]:
    """Each control row's `measure` against the observed row of its up layer: the observed
    value is 'above' / 'below' the control's when their intervals are apart."""
    observed = {r.up_layer: r for r in rows if r.kind == "observed"}
    out = []
    for r in rows:
        o = observed.get(r.up_layer)
        if o is None or r is o:
            continue
        v = verdict(o.intervals.get(measure), r.intervals.get(measure))
        out.append(
            {
                "up_layer": r.up_layer,
                "control": r.kind,
                "measure": measure,
                "observed": getattr(o, measure),
                "control_value": getattr(r, measure),
                "observed_vs_control": v,
            }
        )
    return out


def format_rows(rows: list[ControlRow], cfg: EvolutionConfig | None = None) -> str:
    """The controls table: one line per row, rates with their intervals; then the thresholds
    and how the intervals were made (given `cfg`)."""

    def f(v: float | None, iv: Interval | None = None) -> str:
        text = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
        return text if iv is None else f"{text} [{iv.low:.3f},{iv.high:.3f}]"

    head = (
        f"{'control':>12} {'pair':>7} {'pass-through [95% CI]':>24} {'disappear [CI]':>22} "
        f"{'appear [CI]':>22} {'bestP p50':>9} {'p90':>6} {'dec cos':>7}"
    )
    lines = [head]
    for r in rows:
        iv = r.intervals
        lines.append(
            f"{r.kind:>12} {r.up_layer:>3}-{r.down_layer:<3} "
            f"{f(r.pass_through, iv.get('pass_through')):>24} "
            f"{f(r.disappear, iv.get('disappear')):>22} {f(r.appear, iv.get('appear')):>22} "
            f"{f(r.best_pearson['p50']):>9} {f(r.best_pearson['p90']):>6} "
            f"{f(r.matched_decoder_cos['mean']):>7}"
        )
    if cfg is not None:
        lines.append(
            f"pass-through: best-partner Pearson >= {cfg.pass_through}; disappear / appear: no "
            f"partner of Pearson >= {cfg.link_threshold}; 95% CI: bootstrap over contexts, "
            f"symmetric about the rate (reaching both percentiles), partners fixed"
        )
    return "\n".join(lines)


def rows_json(rows: list[ControlRow]) -> list[dict]:
    """JSON rows (intervals as [low, high] or None)."""
    out = []
    for r in rows:
        d = {k: v for k, v in r.__dict__.items() if k != "intervals"}
        d["intervals"] = {k: None if v is None else [v.low, v.high] for k, v in r.intervals.items()}
        out.append(d)
    return out


def load_codes(
    source: ActivationSource,
    run: Path,
    seed_run: Path | None,
    up_layers: list[int],
    ctl: ControlsConfig,
    rescale: bool,
    max_tokens: int | None = None,
) -> tuple[dict[tuple[str, int], LayerCodes], Tensor]:
    """Codes of every SAE the controls of `up_layers` need: ("main", layer) from the per-layer
    set `run`, ("seed", layer) from the second-seed set `seed_run` (at the up layers it has)."""
    main = dict(load_per_layer(run))
    missing = [u for u in up_layers if u not in main]
    if missing:
        raise MlsaeError(f"{run} has no SAE of layer(s) {missing} (it has {sorted(main)})")
    want = {u + g for u in up_layers for g in (0, 1, *ctl.gaps)} & set(main)
    saes = [(("main", ly), main[ly]) for ly in sorted(want)]
    if seed_run is not None:
        from mlsae.sae.folders import RunFolder, load_sae

        seeds = {ly: load_sae(d) for ly, d in RunFolder(Path(seed_run)).per_layer_dirs()}
        saes += [(("seed", ly), seeds[ly]) for ly in up_layers if ly in seeds]
        if not any(k[0] == "seed" for k, _ in saes):
            raise MlsaeError(f"{seed_run} has no SAE of layer(s) {up_layers}")
    codes, ctx = encode_stream(source, [(k[1], s) for k, s in saes], rescale, max_tokens)
    return {k: c for (k, _), c in zip(saes, codes, strict=True)}, ctx
