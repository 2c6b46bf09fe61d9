"""Adjacent-layer statistics (SPEC 6) against brute-force dense computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlsae.core.errors import MlsaeError
from mlsae.evolution.measures import (
    EvolutionConfig,
    measures,
    plan_groups,
    summarize_pair,
)
from mlsae.evolution.stats import FeatureStats, PairStats


def to_codes(dense: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, d] >= 0 -> TopK codes with k >= every row's activity (indices distinct per
    row; zeros pad), so the codes hold the dense matrix exactly."""
    k = min(max(k, int((dense > 0).sum(1).max())), dense.shape[1])
    acts, idx = dense.topk(k, dim=1)
    return idx, acts


def random_sparse(n: int, d: int, k: int, gen: torch.Generator, dead: int = 1) -> torch.Tensor:
    """[n, d] with <= k positive entries per row, the last `dead` features never active."""
    x = torch.zeros(n, d)
    live = d - dead
    for t in range(n):
        m = int(torch.randint(0, k + 1, (1,), generator=gen))
        f = torch.randperm(live, generator=gen)[:m]
        x[t, f] = torch.rand(m, generator=gen) * 3
    return x


def feed(
    a: torch.Tensor, b: torch.Tensor, k: int, batches: list[slice], contexts: int = 3
) -> tuple[FeatureStats, FeatureStats, PairStats]:
    """Pass 1 then pass 2 over the given token batches (any order)."""
    ia, aa = to_codes(a, k)
    ib, ab = to_codes(b, k)
    pos = torch.arange(len(a))
    up, down = FeatureStats(a.shape[1], contexts), FeatureStats(b.shape[1], contexts)
    for sl in batches:
        up.update(ia[sl], aa[sl], pos[sl])
        down.update(ib[sl], ab[sl], pos[sl])
    pair = PairStats(up.threshold(), down.threshold(), max_entries=37)
    for sl in batches:
        pair.update(ia[sl], aa[sl], ib[sl], ab[sl])
    return up, down, pair


def brute(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> dict[str, np.ndarray]:
    """Every measure as a dense [d_up, d_down] matrix, straight from the definitions."""
    da, db = a.shape[1], b.shape[1]
    pear = np.full((da, db), np.nan)
    for i in range(da):
        for j in range(db):
            if a[:, i].std() > 0 and b[:, j].std() > 0:
                pear[i, j] = np.corrcoef(a[:, i], b[:, j])[0, 1]
    on_a = a > 0.2 * a.max(0)
    on_b = b > 0.2 * b.max(0)
    co = on_a.T.astype(float) @ on_b.astype(float)
    na, nb = on_a.sum(0)[:, None], on_b.sum(0)[None, :]
    union = na + nb - co
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, co / union, 0.0)
        suf = np.where(na > 0, co / na, np.nan)
        nec = np.where(nb > 0, co / nb, np.nan)
    ua = wa / np.linalg.norm(wa, axis=1, keepdims=True)
    ub = wb / np.linalg.norm(wb, axis=1, keepdims=True)
    return {
        "pearson": pear,
        "jaccard": jac,
        "sufficiency": suf,
        "necessity": nec,
        "decoder_cos": ua @ ub.T,
    }


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    n, da, db, k = 300, 12, 9, 4
    a = random_sparse(n, da, k, gen)
    # down layer: a noisy copy of some up features plus fresh ones
    b = torch.zeros(n, db)
    b[:, :5] = a[:, :5] * (torch.rand(n, 5, generator=gen) > 0.2)
    b[:, 5:8] = random_sparse(n, 3, 2, gen, dead=0)
    wa, wb = torch.randn(da, 6, generator=gen), torch.randn(db, 6, generator=gen)
    return a, b, wa, wb, k


def test_measures_equal_brute_force(data):
    a, b, wa, wb, k = data
    up, down, pair = feed(a, b, k, [slice(0, len(a))])
    got = measures(
        up,
        down,
        pair,
        torch.arange(a.shape[1])[:, None],
        torch.arange(b.shape[1])[None, :],
        torch.nn.functional.normalize(wa.double(), dim=1),
        torch.nn.functional.normalize(wb.double(), dim=1),
    )
    want = brute(a.double().numpy(), b.double().numpy(), wa.double().numpy(), wb.double().numpy())
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name], atol=1e-10, err_msg=name)
    block = measures(  # the dense row-block path used by summarize_pair
        up,
        down,
        pair,
        slice(2, 9),
        None,
        *(torch.nn.functional.normalize(w.double(), dim=1) for w in (wa, wb)),
    )
    for name in want:
        tol = 1e-6 if name == "decoder_cos" else 1e-10  # computed in float32 there
        np.testing.assert_allclose(block[name].numpy(), want[name][2:9], atol=tol, err_msg=name)
    assert up.alive.tolist() == (a.max(0).values > 0).tolist()
    assert not bool(up.alive[-1]) and not bool(down.alive[-1])  # the dead features
    np.testing.assert_allclose(up.density().numpy(), (a > 0).double().mean(0).numpy())


def test_top_contexts_are_the_largest(data):
    a, b, _, _, k = data
    up, _, _ = feed(a, b, k, [slice(0, len(a))], contexts=3)
    for f in range(a.shape[1]):
        col = a[:, f]
        want = col[col > 0].sort(descending=True).values[:3]
        got = up.top_val[f][up.top_val[f] > -math.inf]
        torch.testing.assert_close(got, want)
        for v, p in zip(got, up.top_pos[f][: len(got)], strict=True):
            assert a[int(p), f] == v


def test_streaming_independent_of_batch_size_and_order(data):
    a, b, _, _, k = data
    n = len(a)
    ref = feed(a, b, k, [slice(0, n)])
    sizes = [slice(s, min(s + 7, n)) for s in range(0, n, 7)]
    perm = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(3))
    for batches in (sizes, [sizes[i] for i in perm]):
        got = feed(a, b, k, batches)
        for r, g in zip(ref, got, strict=True):
            for name in ("sum", "sumsq", "max", "nonzero", "top_val", "cross", "co", "n_up"):
                if hasattr(r, name):
                    torch.testing.assert_close(
                        getattr(g, name), getattr(r, name), rtol=1e-12, atol=1e-12
                    )


def brute_summary(m: dict[str, np.ndarray], alive_a, alive_b, cfg: EvolutionConfig):
    """Best partners, fractions and AND/OR lists from the dense matrices."""
    p = np.where(
        alive_a[:, None] & alive_b[None, :] & ~np.isnan(m["pearson"]), m["pearson"], -np.inf
    )
    best_next, best_prev = p.max(1)[alive_a], p.max(0)[alive_b]
    nec = np.nan_to_num(m["necessity"], nan=-1)
    suf = np.nan_to_num(m["sufficiency"], nan=-1)
    ands = [j for j in range(nec.shape[1]) if (nec[:, j] >= cfg.boolean_threshold).sum() == 2]
    ors = [j for j in range(suf.shape[1]) if (suf[:, j] >= cfg.boolean_threshold).sum() == 2]
    return {
        "pass_through": float((best_next >= cfg.pass_through).mean()),
        "disappear": float((best_next < cfg.link_threshold).mean()),
        "appear": float((best_prev < cfg.link_threshold).mean()),
        "and": ands,
        "or": ors,
        "p": p,
    }


@pytest.mark.parametrize("block", [5, 1 << 21])
def test_summary_equals_brute_force(data, block):
    a, b, wa, wb, k = data
    up, down, pair = feed(a, b, k, [slice(0, len(a))])
    cfg = EvolutionConfig(top_m=2, min_support=1, pass_through=0.6, link_threshold=0.3)
    res = summarize_pair(up, down, pair, cfg, wa, wb, layers=(4, 5), block_entries=block * 9)
    m = brute(a.double().numpy(), b.double().numpy(), wa.double().numpy(), wb.double().numpy())
    want = brute_summary(m, up.alive.numpy(), down.alive.numpy(), cfg)
    s = res.summary
    assert s is not None
    for key in ("pass_through", "disappear", "appear"):
        assert getattr(s, key) == pytest.approx(want[key]), key
    assert [x[0] for x in res.and_features] == want["and"]
    assert [x[0] for x in res.or_features] == want["or"]
    assert s.dead_up == 1 and s.dead_down == 1 and s.up_layer == 4
    # edges: union of each alive row's and column's top-2 positive Pearson partners
    p = want["p"]
    expect = set()
    for i in range(p.shape[0]):
        expect |= {(i, int(j)) for j in np.argsort(-p[i])[:2] if p[i, j] > 0}
    for j in range(p.shape[1]):
        expect |= {(int(i), j) for i in np.argsort(-p[:, j])[:2] if p[i, j] > 0}
    got = set(zip(res.edges["up"].tolist(), res.edges["down"].tolist(), strict=True))
    assert got == expect
    for name in ("pearson", "jaccard", "sufficiency", "necessity", "decoder_cos"):
        np.testing.assert_allclose(
            res.edges[name].numpy(), m[name][res.edges["up"], res.edges["down"]], atol=1e-10
        )


def test_threshold_edges(data):
    a, b, wa, wb, k = data
    up, down, pair = feed(a, b, k, [slice(0, len(a))])
    cfg = EvolutionConfig(top_m=0, edge_threshold=0.4, edge_measure="jaccard")
    res = summarize_pair(up, down, pair, cfg, wa, wb, block_entries=4 * 9)
    m = brute(a.double().numpy(), b.double().numpy(), wa.double().numpy(), wb.double().numpy())
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(m["jaccard"] >= 0.4), strict=True)}
    assert (
        want and set(zip(res.edges["up"].tolist(), res.edges["down"].tolist(), strict=True)) == want
    )


def constructed(n: int = 3000, seed: int = 1):
    """Up layer: 6 independent features firing with p=0.3 at value 1. Down layer:
    0 = copy of up 0, 1 = up1 AND up2, 2 = up3 OR up4, 3 = independent (appears)."""
    g = torch.Generator().manual_seed(seed)
    fire = (torch.rand(n, 6, generator=g) < 0.3).float()
    a = fire * (0.5 + 0.5 * torch.rand(n, 6, generator=g))
    a[:, 1:5] = fire[:, 1:5]  # constant value: active exactly when fired
    b = torch.zeros(n, 4)
    b[:, 0] = a[:, 0]
    b[:, 1] = fire[:, 1] * fire[:, 2]
    b[:, 2] = torch.maximum(fire[:, 3], fire[:, 4])
    b[:, 3] = (torch.rand(n, generator=g) < 0.3).float()
    return a, b


def test_constructed_pass_through_and_or_appear():
    a, b = constructed()
    up, down, pair = feed(a, b, 6, [slice(s, s + 512) for s in range(0, len(a), 512)])
    res = summarize_pair(up, down, pair, EvolutionConfig(min_support=1))
    assert res.best_next[0] == pytest.approx(1.0) and int(res.best_next_idx[0]) == 0
    assert res.summary is not None and res.summary.pass_through == pytest.approx(1 / 6)
    assert res.and_features == [(1, 1, 2)]
    assert res.or_features == [(2, 3, 4)]
    assert float(res.best_prev[3]) < 0.1
    # appear: the independent feature, and the AND (its best Pearson, sqrt(p/(1+p)) = 0.48 at
    # p = 0.3, is below the 0.5 link threshold); not the copy nor the OR (Pearson 0.64)
    assert (res.best_prev < 0.5).tolist() == [False, True, False, True]
    assert res.summary.appear == pytest.approx(2 / 4)
    # AND feature 1 fires on a subset of up 1 (necessity 1, sufficiency ~0.3): specialised
    assert (1, 1) in res.specialised or (1, 2) in res.specialised


def test_min_support_drops_rare_features():
    a, b = constructed(n=400)
    up, down, pair = feed(a, b, 6, [slice(0, len(a))])
    res = summarize_pair(up, down, pair, EvolutionConfig(min_support=10_000))
    assert res.and_features == [] and res.or_features == []


def test_plan_groups_respects_budget():
    sizes = [(1000, 1000)] * 5  # 12 MB each
    assert plan_groups(sizes, 0.025) == [[0, 1], [2, 3], [4]]
    assert plan_groups(sizes, 1.0) == [[0, 1, 2, 3, 4]]
    with pytest.raises(MlsaeError, match="memory-gb"):
        plan_groups(sizes, 0.001)
    with pytest.raises(MlsaeError):
        EvolutionConfig(top_m=0, edge_threshold=None)
