"""Intervals over contexts of the evolution rates (issue 24 item 1) against a brute-force loop
over the same resampling draws, and the null model (issue 24 3b) on a constructed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_evolution import constructed, feed, to_codes

from mlsae.core.bootstrap import resample_indices
from mlsae.core.stage_config import BootstrapConfig, EvolutionConfig
from mlsae.evolution.codes import CodeStore
from mlsae.evolution.intervals import Selected, overall, rate_intervals, select
from mlsae.evolution.measures import summarize_pair

CTX = 50


def brute_rates(a: np.ndarray, b: np.ndarray, thr, sel: Selected, cfg: EvolutionConfig):
    """The rates of one token set from dense activations a [n, d_up], b [n, d_dn], partners
    fixed by `sel`, in plain loops from the definitions (SPEC 6 and the exclusive rule)."""

    def pearson(e: int) -> float:
        x, y = a[:, int(sel.ui[e])], b[:, int(sel.dj[e])]
        return float(np.corrcoef(x, y)[0, 1]) if e >= 0 and x.std() > 0 and y.std() > 0 else -1e9

    def counts(e: int) -> tuple[float, float]:  # sufficiency, necessity (NaN: undefined)
        i, j = int(sel.ui[e]), int(sel.dj[e])
        on_a, on_b = a[:, i] > thr[0][i], b[:, j] > thr[1][j]
        both = float((on_a & on_b).sum())
        return (
            both / on_a.sum() if on_a.sum() else np.nan,
            both / on_b.sum() if on_b.sum() else np.nan,
        )

    t = cfg.boolean_threshold
    nxt = [pearson(int(e)) for e in sel.next_e]
    prv = [pearson(int(e)) for e in sel.prev_e]
    n_and = n_or = n_spec = 0
    for e1, e2 in sel.and_e.tolist():
        (s1, n1), (s2, n2) = counts(e1), counts(e2)
        ok = n1 >= t and n2 >= t
        n_and += ok and (not cfg.boolean_exclusive or (s1 < t and s2 < t))
    for e1, e2 in sel.or_e.tolist():
        (s1, n1), (s2, n2) = counts(e1), counts(e2)
        ok = s1 >= t and s2 >= t
        n_or += ok and (not cfg.boolean_exclusive or (n1 < t and n2 < t and n1 + n2 >= t))
    for e in sel.spec_e.tolist():
        s1, n1 = counts(e)
        n_spec += n1 >= cfg.specialise_necessity and s1 <= cfg.specialise_sufficiency
    nd = len(prv)
    return {
        "pass_through": sum(p >= cfg.pass_through for p in nxt) / len(nxt),
        "disappear": sum(p < cfg.link_threshold for p in nxt) / len(nxt),
        "appear": sum(p < cfg.link_threshold for p in prv) / nd,
        "and_rate": n_and / nd,
        "or_rate": n_or / nd,
        "specialised": n_spec / nd,
    }


def _store(tmp_path, a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor) -> CodeStore:
    store = CodeStore(tmp_path, 2)
    for p, x in enumerate((a, b)):
        idx, acts = to_codes(x, 6)
        store.add(p, idx, acts)
    store.add_positions(pos)
    store.close()
    return store


@pytest.mark.parametrize("exclusive", [True, False])
def test_rate_intervals_equal_a_brute_force_loop(tmp_path, exclusive) -> None:
    a, b = constructed(n=600, seed=3)
    b[:40, 3] = 0.0  # contexts differ
    # used tokens at stream positions with gaps (special tokens left out): 13 contexts
    pos = torch.arange(len(a)) + torch.arange(len(a)) // 47
    cfg = EvolutionConfig(
        min_support=1,
        boolean_exclusive=exclusive,
        pass_through=0.9,
        link_threshold=0.5,
        boolean_threshold=0.99,
    )
    up, down, pair = feed(a, b, 6, [slice(0, len(a))])
    res = summarize_pair(up, down, pair, cfg)
    assert res.and_features and res.or_features and res.specialised  # every rate is exercised
    store = _store(tmp_path, a, b, pos)
    boot = BootstrapConfig(bootstrap=60, bootstrap_seed=4)
    (got,), found, bs = rate_intervals([res], [up, down], store, cfg, boot, CTX)
    # brute force: the same draws, each resample's tokens gathered and every rate recomputed
    ctx = np.unique((pos // CTX).numpy(), return_inverse=True)[1]
    C = int(ctx.max()) + 1
    assert bs.info.n_contexts == C
    sel = select(res, up.alive, down.alive)
    thr = (up.threshold().numpy(), down.threshold().numpy())
    members = [np.nonzero(ctx == c)[0] for c in range(C)]
    draws = resample_indices(C, boot.bootstrap, boot.bootstrap_seed)
    an, bn = a.double().numpy(), b.double().numpy()
    rates: dict[str, list[float]] = {k: [] for k in got}
    for row in draws:
        rows = np.concatenate([members[c] for c in row])
        for k, v in brute_rates(an[rows], bn[rows], thr, sel, cfg).items():
            rates[k].append(v)
    whole = brute_rates(an, bn, thr, sel, cfg)  # the centre: every rate on all tokens
    for k, s in ((k, getattr(res.summary, k)) for k in ("pass_through", "appear", "disappear")):
        assert whole[k] == pytest.approx(s, abs=1e-12), k  # the reported rate
    for k, iv in got.items():
        v = np.asarray(rates[k])
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [2.5, 97.5])
        h = max(hi - whole[k], whole[k] - lo)  # symmetric about it, reaching both percentiles
        assert iv is not None, k
        assert iv.low == pytest.approx(max(whole[k] - h, 0), abs=1e-9), k
        assert iv.high == pytest.approx(min(whole[k] + h, 1), abs=1e-9), k
        assert iv.low <= whole[k] <= iv.high, k
    pt = got["pass_through"]
    assert pt is not None and pt.low <= pt.high
    # one pair: the findings over all pairs are its pass-through and its AND + OR rate
    assert found["pass_through_mean"] == pt
    boolean = np.asarray(rates["and_rate"]) + np.asarray(rates["or_rate"])
    t = whole["and_rate"] + whole["or_rate"]
    lo, hi = np.percentile(boolean, [2.5, 97.5])
    h = max(hi - t, t - lo)
    iv = found["boolean_fraction"]
    assert iv is not None
    assert iv.low == pytest.approx(max(t - h, 0), abs=1e-9)
    assert iv.high == pytest.approx(min(t + h, 1), abs=1e-9)


def test_overall_findings_pool_the_pairs() -> None:
    """Mean pass-through over the pairs that have one; AND + OR and specialised over all
    alive down features (numpy on the same numbers)."""
    rng = np.random.default_rng(0)
    names = ("pass_through", "and_rate", "or_rate", "specialised")
    rows = [{k: torch.from_numpy(rng.random(5) / 4) for k in names} for _ in range(3)]
    rows[1]["pass_through"][:] = float("nan")  # a pair without alive up features
    got = overall(rows, [10, 30, 60])
    a = np.stack([[r[k].numpy() for k in names] for r in rows])  # [pair, rate, R]
    w = np.array([10, 30, 60.0])[:, None]
    np.testing.assert_allclose(got["pass_through_mean"], a[[0, 2], 0].mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        got["boolean_fraction"], ((a[:, 1] + a[:, 2]) * w).sum(0) / 100, rtol=1e-12
    )
    np.testing.assert_allclose(got["specialised_fraction"], (a[:, 3] * w).sum(0) / 100, rtol=1e-12)


def test_the_null_model_destroys_the_relations(tmp_path) -> None:
    """Down features built from up features: AND / OR / pass-through found on the data, none
    once the down layer's tokens are permuted."""
    from mlsae.evolution.run import second_pass
    from mlsae.evolution.stats import FeatureStats

    a, b = constructed(n=2000, seed=5)
    store = CodeStore(tmp_path, 2)
    stats = [FeatureStats(6), FeatureStats(4)]
    for p, x in enumerate((a, b)):
        idx, acts = to_codes(x, 6)
        store.add(p, idx, acts)
        stats[p].update(idx, acts)
    store.close()

    class Sae:  # second_pass reads only the decoder
        def __init__(self, d: int) -> None:
            self.W_dec = torch.eye(d, 8)

    saes = [(0, Sae(6)), (1, Sae(4))]
    cfg = EvolutionConfig(min_support=1, seed=2)
    (res,) = second_pass(saes, stats, store, cfg)  # type: ignore[arg-type]
    s = res.summary
    assert s is not None and s.null is not None
    assert (s.n_and, s.n_or) == (1, 1) and s.pass_through == pytest.approx(1 / 6)
    assert (s.null.n_and, s.null.n_or, s.null.pass_through) == (0, 0, 0.0)
    assert s.null.permutation == "global" and s.null.seed == 2
