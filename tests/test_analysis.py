"""Layer statistics (SPEC 4) and residual geometry against brute-force dense computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlsae.analysis.geometry import ResidualGeometry, hist_quantiles, residual_geometry
from mlsae.analysis.layers import LayerStats

LAYERS = [0, 2, 3, 7]  # block indices with gaps: the variable is the block index


def random_acts(n=40, L=4, n_lat=12, density=0.3, seed=0):
    """Dense a[t,l,j] >= 0 with inactive pairs, one dead latent, and special tokens that alone
    activate latent 0 (so latent 0 must come out dead once they are masked)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, L, n_lat, generator=g) * (torch.rand(n, L, n_lat, generator=g) < density)
    a[:, :, 0] = 0
    a[:, :, -1] = 0  # dead latent
    mask = torch.rand(n, generator=g) > 0.2
    a[~mask, :, 0] = 5.0  # only special tokens use latent 0, hugely
    return a.double(), mask


def brute(a: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> dict:
    """Every statistic straight from the SPEC formulas with explicit loops over tokens/latents."""
    a = a[mask].numpy().astype(np.float64)  # [T, L, n]
    T, L, n = a.shape
    v = np.asarray(layers, dtype=np.float64)
    total = a.sum()
    S = a.sum(0)  # [L, n]
    alive = [j for j in range(n) if S[:, j].sum() > 0]
    P = {j: S[:, j] / S[:, j].sum() for j in alive}
    E = {j: float(v @ P[j]) for j in alive}
    V = {j: float(P[j] @ (v - E[j]) ** 2) for j in alive}
    pJ = {j: S[:, j].sum() / total for j in alive}
    pL = S.sum(1) / total
    var_L = float(pL @ (v - pL @ v) ** 2)
    e_var_j = sum(pJ[j] * V[j] for j in alive)
    e_var_tj = 0.0
    tok_var = dict.fromkeys(alive, 0.0)
    pairs = multi = 0
    hist = [0] * (L + 1)
    multi_j = dict.fromkeys(alive, 0)
    pairs_j = dict.fromkeys(alive, 0)
    for t in range(T):
        for j in range(n):
            s = a[t, :, j].sum()
            if s <= 0:
                continue
            p = a[t, :, j] / s  # P(L | T=t, J=j)
            m = p @ v
            var = p @ (v - m) ** 2
            e_var_tj += (s / total) * var  # P(T=t, J=j) = s_tj / total
            tok_var[j] += (s / S[:, j].sum()) * var  # P(T=t | J=j)
            pairs += 1
            pairs_j[j] += 1
            hist[int((a[t, :, j] > 0).sum())] += 1
            if (a[t, :, j] > 0).sum() > 1:
                multi += 1
                multi_j[j] += 1
    return dict(
        alive=alive,
        P=P,
        E=E,
        V=V,
        tok_var=tok_var,
        pL=pL,
        var_L=var_L,
        e_var_j=e_var_j,
        e_var_tj=e_var_tj,
        rel_var_latent=e_var_j / var_L,
        rel_var_token=e_var_tj / e_var_j,
        agg=np.mean([(S[:, j] > 0).sum() > 1 for j in alive]),
        tok=multi / pairs,
        tok_per_latent=np.mean([multi_j[j] / pairs_j[j] for j in alive]),
        n_tokens=T,
        hist=hist,
    )


def check_against_brute(r, b, rtol=1e-10):
    n = r.n_latents
    assert r.n_tokens == b["n_tokens"]
    assert r.n_latents_alive == len(b["alive"])
    dead = [j for j in range(n) if j not in b["alive"]]
    assert np.all(np.isnan(r.expected_layer[dead])) and np.all(np.isnan(r.var_latent[dead]))
    for j in b["alive"]:
        np.testing.assert_allclose(r.p_layer_given_latent[j], b["P"][j], rtol=rtol)
        assert r.expected_layer[j] == pytest.approx(b["E"][j], rel=rtol)
        assert r.var_latent[j] == pytest.approx(b["V"][j], rel=rtol, abs=1e-12)
        assert r.var_token[j] == pytest.approx(b["tok_var"][j], rel=rtol, abs=1e-12)
    np.testing.assert_allclose(r.p_layer, b["pL"], rtol=rtol)
    for key, val in [
        ("var_layer", b["var_L"]),
        ("mean_var_latent", b["e_var_j"]),
        ("mean_var_token", b["e_var_tj"]),
        ("rel_var_latent", b["rel_var_latent"]),
        ("rel_var_token", b["rel_var_token"]),
        ("multi_layer_fraction_aggregate", b["agg"]),
        ("multi_layer_fraction_token", b["tok"]),
        ("multi_layer_fraction_token_per_latent", b["tok_per_latent"]),
    ]:
        assert getattr(r, key) == pytest.approx(val, rel=rtol), key


def test_dense_matches_brute_force_with_mask_and_dead():
    a, mask = random_acts()
    st = LayerStats(a.shape[2], LAYERS)
    st.update_dense(a, mask)
    r = st.result()
    b = brute(a, mask, LAYERS)
    assert 0 not in b["alive"]  # latent 0 only fires on (masked) special tokens
    check_against_brute(r, b)
    assert r.n_latents_dead == 2
    assert r.active_layers_hist == b["hist"]
    assert r.n_latents_alive == len(b["alive"])


def test_unmasked_differs():
    """The mask matters: keeping special tokens revives latent 0 and changes the ratios."""
    a, mask = random_acts()
    st = LayerStats(a.shape[2], LAYERS)
    st.update_dense(a)
    r = st.result()
    check_against_brute(r, brute(a, torch.ones_like(mask), LAYERS))
    assert r.n_latents_alive == a.shape[2] - 1


def topk_batch(n=30, L=4, n_lat=16, k=3, seed=1):
    """Sparse TopK output (ReLU, some zero acts kept in top_acts) and its dense scatter."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, L, n_lat, generator=g)
    vals, idx = pre.topk(k, dim=-1)
    vals = vals.relu()
    dense = torch.zeros(n, L, n_lat).scatter_(-1, idx, vals)
    mask = torch.rand(n, generator=g) > 0.15
    return vals, idx, dense.double(), mask


def test_sparse_equals_dense_and_brute():
    vals, idx, dense, mask = topk_batch()
    sp = LayerStats(16, LAYERS)
    sp.update(vals, idx, mask)
    b = brute(dense, mask, LAYERS)
    check_against_brute(sp.result(), b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_independent_of_batching_and_order(seed):
    vals, idx, dense, mask = topk_batch(n=60, seed=seed)
    one = LayerStats(16, LAYERS)
    one.update(vals, idx, mask)
    g = torch.Generator().manual_seed(seed + 10)
    perm = torch.randperm(60, generator=g)
    many = LayerStats(16, LAYERS)
    start = 0
    for size in [1, 7, 13, 2, 30, 7]:
        sel = perm[start : start + size]
        many.update(vals[sel], idx[sel], mask[sel])
        start += size
    assert start == 60
    r1, r2 = one.result(), many.result()
    for key in ["rel_var_latent", "rel_var_token", "mean_var_token", "var_layer"]:
        assert getattr(r1, key) == pytest.approx(getattr(r2, key), rel=1e-12)
    np.testing.assert_allclose(r1.var_token, r2.var_token, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(
        r1.p_layer_given_latent, r2.p_layer_given_latent, rtol=1e-12, equal_nan=True
    )
    assert r1.active_layers_hist == r2.active_layers_hist
    # merging two halves is the same as one pass
    h1, h2 = LayerStats(16, LAYERS), LayerStats(16, LAYERS)
    h1.update(vals[:25], idx[:25], mask[:25])
    h2.update(vals[25:], idx[25:], mask[25:])
    h1.merge(h2)
    assert h1.result().rel_var_token == pytest.approx(r1.rel_var_token, rel=1e-12)


def test_one_layer_per_token_gives_zero_token_variance():
    """Each latent active at exactly one layer on each token, at different layers across tokens."""
    g = torch.Generator().manual_seed(3)
    n, L, n_lat = 50, len(LAYERS), 8
    a = torch.zeros(n, L, n_lat, dtype=torch.float64)
    lay = torch.randint(0, L, (n, n_lat), generator=g)
    a.scatter_(1, lay[:, None, :], torch.rand(n, 1, n_lat, generator=g, dtype=torch.float64) + 0.1)
    st = LayerStats(n_lat, LAYERS)
    st.update_dense(a)
    r = st.result()
    assert r.rel_var_token == 0.0
    assert r.rel_var_latent > 0.5
    assert r.multi_layer_fraction_token == 0.0
    assert r.multi_layer_fraction_aggregate == 1.0
    assert r.active_layers_hist[1] == n * n_lat


def test_equal_at_all_layers_gives_token_ratio_one():
    g = torch.Generator().manual_seed(4)
    n, n_lat = 20, 6
    c = torch.rand(n, 1, n_lat, generator=g, dtype=torch.float64) * (
        torch.rand(n, 1, n_lat, generator=g) < 0.7
    )
    a = c.expand(n, len(LAYERS), n_lat).clone()
    st = LayerStats(n_lat, LAYERS)
    st.update_dense(a)
    r = st.result()
    assert r.rel_var_token == pytest.approx(1.0, abs=1e-12)
    assert r.rel_var_latent == pytest.approx(1.0, abs=1e-12)
    assert r.multi_layer_fraction_token == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_ratios_in_unit_interval(seed):
    a, mask = random_acts(n=30, density=0.15 + 0.15 * seed, seed=seed)
    st = LayerStats(a.shape[2], LAYERS)
    st.update_dense(a, mask)
    r = st.result()
    assert 0.0 <= r.rel_var_latent <= 1.0
    assert 0.0 <= r.rel_var_token <= 1.0


def test_block_index_not_position():
    """Shifting the block indices leaves the ratios unchanged; gaps change them."""
    a, mask = random_acts(seed=5)
    res = {}
    for name, layers in {"pos": [0, 1, 2, 3], "shift": [5, 6, 7, 8], "gaps": [0, 1, 2, 9]}.items():
        st = LayerStats(a.shape[2], layers)
        st.update_dense(a, mask)
        res[name] = st.result()
    assert res["shift"].rel_var_latent == pytest.approx(res["pos"].rel_var_latent, rel=1e-10)
    assert res["shift"].rel_var_token == pytest.approx(res["pos"].rel_var_token, rel=1e-10)
    assert res["gaps"].var_layer != pytest.approx(res["pos"].var_layer, rel=1e-3)
    check_against_brute(res["gaps"], brute(a, mask, [0, 1, 2, 9]))


def test_single_layer_ratios_undefined():
    st = LayerStats(5, [3])
    st.update_dense(torch.rand(4, 1, 5))
    r = st.result()
    assert r.var_layer == 0.0 and math.isnan(r.rel_var_latent) and math.isnan(r.rel_var_token)


# ---------------------------------------------------------------- residual geometry


def random_resid(n=80, L=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, d, generator=g)
    x = base + 0.7 * torch.randn(n, L, d, generator=g) + torch.arange(L).view(1, L, 1) * 0.8
    x = x * (1 + torch.arange(L)).view(1, L, 1)  # norms grow with depth
    mask = torch.rand(n, generator=g) > 0.2
    x[~mask] = 1e3  # special tokens: huge, must not move any number
    return x.float(), mask


def test_geometry_matches_dense_two_passes_any_batching():
    x, mask = random_resid()
    xm = x[mask].double()  # [T, L, d]
    mu = xm.mean(0)
    xc = xm - mu
    cos = torch.nn.functional.cosine_similarity(xc[:, :-1], xc[:, 1:], dim=-1).mean(0)
    raw = torch.nn.functional.cosine_similarity(xm[:, :-1], xm[:, 1:], dim=-1).mean(0)
    norms = xm.norm(dim=-1)  # [T, L]

    def batches():
        for s in range(0, x.shape[0], 11):
            yield x[s : s + 11], mask[s : s + 11]

    geo = residual_geometry(batches, LAYERS, 6, bins=1000)
    np.testing.assert_allclose(geo.adjacent_cosine, cos.numpy(), rtol=1e-10)
    np.testing.assert_allclose(geo.adjacent_cosine_raw, raw.numpy(), rtol=1e-10)
    np.testing.assert_allclose(geo.norm_mean, norms.mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(geo.norm_std, norms.std(0, unbiased=False).numpy(), rtol=1e-8)
    np.testing.assert_allclose(geo.norm_max, norms.max(0).values.numpy(), rtol=1e-12)
    assert geo.n_tokens == int(mask.sum())
    width = (norms.max(0).values - norms.min(0).values).numpy() / 1000
    nn = norms.numpy()
    for q, vals in geo.norm_quantiles.items():  # a q-quantile to within one bin width
        val = np.asarray(vals)
        assert np.all((nn <= val + width).mean(0) >= float(q)), q
        assert np.all((nn < val - width).mean(0) <= float(q)), q
    # whole-data single batch gives the same
    geo1 = residual_geometry(lambda: [(x, mask)], LAYERS, 6, bins=1000)
    np.testing.assert_allclose(geo1.adjacent_cosine, geo.adjacent_cosine, rtol=1e-12)


def test_geometry_pass_order_enforced():
    x, mask = random_resid(n=10)
    geo = ResidualGeometry(LAYERS, 6)
    geo.update_pass1(x, mask)
    geo.update_pass2(x[:5], mask[:5])
    with pytest.raises(Exception, match="not the same data"):
        geo.result()


def test_hist_quantiles_uniform():
    hist = np.full((1, 100), 10)
    q = hist_quantiles(hist, np.array([0.0]), np.array([1.0]), [0.25, 0.5, 0.9])
    np.testing.assert_allclose(q[0], [0.25, 0.5, 0.9], atol=1e-12)
