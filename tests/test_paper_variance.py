"""The paper code's variance ratios (SPEC 4) against a brute-force reading of its description."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlsae.analysis.layers import LayerStats
from mlsae.analysis.paper_variance import PaperVariance
from mlsae.core.errors import MlsaeError

LAYERS = [0, 2, 3, 7]  # block indices with gaps; the paper's code uses positions 0..L-1


def sparse_codes(n=90, L=4, n_lat=10, density=0.25, seed=0):
    """Dense a[t,l,j] >= 0: sparse, a never-active latent, tokens with no activity at all, and
    special tokens (mask False) with their own big activations."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, L, n_lat, generator=g) * (torch.rand(n, L, n_lat, generator=g) < density)
    a[:, :, -1] = 0  # never active
    a[::7] = 0  # tokens with no active latent
    mask = torch.rand(n, generator=g) > 0.2
    a[~mask, :, 0] = 9.0
    return a.double(), mask


def brute(a: torch.Tensor, mask: torch.Tensor, B: int) -> dict:
    """Loops over batches, tokens, latents and layers, straight from the description."""
    x = a[mask].numpy()  # [T, L, n] used tokens in order
    T, L, n = x.shape
    full = T // B
    batches = [x[i * B : (i + 1) * B] for i in range(full)] or [x]

    def v(q):  # q: list of L numbers
        return sum(li * li * q[li] for li in range(L)) - sum(li * q[li] for li in range(L)) ** 2

    rows = []
    for xb in batches:
        m = len(xb)
        p = np.zeros((L, m, n))
        for t in range(m):
            for j in range(n):
                s = sum(xb[t, li, j] for li in range(L))
                if s > 0:
                    for li in range(L):
                        p[li, t, j] = xb[t, li, j] / s
        e_tf = sum(v(p[:, t, j]) for t in range(m) for j in range(n)) / (m * n)
        e_f = sum(v([p[li, :, j].mean() for li in range(L)]) for j in range(n)) / n
        var_l = v([p[li].mean() for li in range(L)])
        active = sum(1 for t in range(m) for j in range(n) if p[:, t, j].sum() > 0)
        # diagnostic: each latent's token mean normalised to a distribution r, f Var_r(L)
        fn = 0.0
        for j in range(n):
            q = [p[li, :, j].mean() for li in range(L)]
            f = sum(q)
            if f > 0:
                r = [x / f for x in q]
                mu = sum(li * r[li] for li in range(L))
                fn += f * sum(r[li] * (li - mu) ** 2 for li in range(L))
        fn /= n
        rows.append((e_tf, e_f, var_l, e_f / var_l, e_tf / e_f, active, m, fn, e_tf / fn))
    r = np.asarray(rows)
    return {
        "exp_var_token": r[:, 0].mean(),
        "exp_var_latent": r[:, 1].mean(),
        "var_layer": r[:, 2].mean(),
        "rel_var_latent": r[:, 3].mean(),
        "rel_var_token": r[:, 4].mean(),
        "active_pair_fraction": r[:, 5].sum() / (r[:, 6].sum() * n),
        "n_batches": len(rows),
        "exp_var_latent_normalised": r[:, 7].mean(),
        "rel_var_token_normalised": r[:, 8].mean(),
    }


def feed_chunks(st: LayerStats, a: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
    """Feed dense codes as sparse top-k rows in random chunk sizes (batches straddle chunks)."""
    g = torch.Generator().manual_seed(seed)
    k = a.shape[2]
    acts, idx = torch.topk(a, k, dim=-1)
    s = 0
    while s < len(a):
        e = s + int(torch.randint(1, 13, (1,), generator=g))
        st.update(acts[s:e], idx[s:e], mask[s:e])
        s = e


KEYS = (
    "exp_var_token",
    "exp_var_latent",
    "var_layer",
    "rel_var_latent",
    "rel_var_token",
    "active_pair_fraction",
    "n_batches",
    "exp_var_latent_normalised",
    "rel_var_token_normalised",
)


@pytest.mark.parametrize(("B", "seed"), [(16, 0), (23, 1), (7, 2), (500, 3)])
def test_paper_formula_matches_brute_force(B, seed):
    a, mask = sparse_codes(seed=seed)
    st = LayerStats(a.shape[2], LAYERS, paper_batch_tokens=B)
    feed_chunks(st, a, mask, seed)
    got = st.result().paper_formula
    assert got is not None
    want = brute(a, mask, B)
    for key in KEYS:
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    T = int(mask.sum())
    assert got.batch_tokens == B
    assert got.tokens_in_batches == (T // B) * B if T >= B else T
    assert got.last_partial_batch.startswith(
        "none" if T % B == 0 else "dropped" if T >= B else "used"
    )
    assert got.token_variance_factor == pytest.approx(1 / want["rel_var_token"])


def test_hand_worked_case():
    """One token, latent 0 split evenly over 2 layers, latent 1 never active:
    p = [.5, .5], v(p) = .5 - .25 = .25; e_tf = e_f = .25 / 2; token-and-latent mean
    q = [.25, .25], v(q) = .25 - .0625 = .1875; rel_var_latent = .125 / .1875 = 2/3 (a true
    variance ratio of these codes would be 1), rel_var_token = 1."""
    pv = PaperVariance(2, 2, batch_tokens=1)
    pv.update(torch.tensor([[[1.0], [1.0]]]), torch.tensor([[[0], [0]]]))
    r = pv.result()
    assert r.exp_var_token == pytest.approx(0.125)
    assert r.var_layer == pytest.approx(0.1875)
    assert r.rel_var_latent == pytest.approx(2 / 3)
    assert r.rel_var_token == pytest.approx(1.0)
    assert r.active_pair_fraction == pytest.approx(0.5)


def test_spec_ratios_unchanged_and_no_merge():
    a, mask = sparse_codes(seed=4)
    plain, paper = LayerStats(a.shape[2], LAYERS), LayerStats(a.shape[2], LAYERS, 16)
    feed_chunks(plain, a, mask, 0)
    feed_chunks(paper, a, mask, 1)
    r0, r1 = plain.result(), paper.result()
    assert r0.paper_formula is None
    for key in ("rel_var_latent", "rel_var_token", "var_layer", "mean_var_token"):
        assert getattr(r1, key) == pytest.approx(getattr(r0, key), rel=1e-12)
    # active pairs over all used tokens, counted independently
    x = a[mask]
    want = float((x.sum(1) > 0).sum()) / (x.shape[0] * x.shape[2])
    assert r1.active_pair_fraction == pytest.approx(want)
    with pytest.raises(MlsaeError, match="order"):
        paper.merge(LayerStats(a.shape[2], LAYERS, 16))


def test_no_tokens_is_nan():
    r = PaperVariance(3, 2).result()
    assert r.n_batches == 0 and math.isnan(r.rel_var_token)
    assert r.token_variance_factor is None


@pytest.mark.parametrize("centre", [15, 2])
def test_identical_distribution_on_every_token(centre: int) -> None:
    """A latent whose per-token layer distribution is the SAME on every token where it is
    active (weights 1,2,3,2,1 over blocks centre-2..centre+2, active on 1 token in 64): the
    single-token variance equals the aggregated one, so SPEC's rel_var_token is exactly 1.
    The paper's formula counts the inactive tokens as zero-variance pairs and takes v() of the
    un-normalised token mean, so its ratio is Var_r / (Var_r + (1 - f) E_r[L]^2) (closed form
    below): 167x smaller centred at block 15, 3.95x at block 2, set by where the index starts."""
    L, B, every = 30, 2048, 64
    r = torch.zeros(L, dtype=torch.float64)
    r[centre - 2 : centre + 3] = torch.tensor([1.0, 2, 3, 2, 1]) / 9
    n = 2 * B
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(n, L, 1, dtype=torch.float64)
    active = torch.arange(n) % every == 0
    a[active, :, 0] = r[None, :] * (
        0.5 + torch.rand(int(active.sum()), 1, generator=g, dtype=torch.float64)
    )
    st = LayerStats(1, list(range(L)), paper_batch_tokens=B)
    st.update_dense(a)
    res = st.result()
    assert res.rel_var_token == pytest.approx(1.0, abs=1e-9)
    assert res.rel_var_latent == pytest.approx(1.0, abs=1e-9)  # one latent: Var(L|J) = Var(L)
    values = torch.arange(L, dtype=torch.float64)
    mu = float((r * values).sum())
    var = float((r * (values - mu) ** 2).sum())
    f = 1 / every
    paper = res.paper_formula
    assert paper is not None
    want = var / (var + (1 - f) * mu * mu)
    assert paper.rel_var_token == pytest.approx(want, rel=1e-6)
    assert paper.token_variance_factor == pytest.approx(1 + (1 - f) * mu * mu / var, rel=1e-6)
    assert paper.token_variance_factor > (100 if centre == 15 else 3)
