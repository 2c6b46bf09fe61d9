"""The context bootstrap (core/bootstrap.py, SPEC 7) against brute-force resampling loops: the
same seed draws the same contexts, so the vectorised count-matrix path must give the loop's
numbers; and the evaluation's per-context sums against a plain recomputation of FVU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae.core.bootstrap import Bootstrap, resample_indices, total_variance
from mlsae.core.errors import MlsaeError
from mlsae.eval.contexts import ContextSums


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_ratio_matches_a_resampling_loop() -> None:
    rng = np.random.default_rng(1)
    C, B = 13, 200
    num = rng.gamma(2.0, size=C)
    den = rng.gamma(5.0, size=C) + 0.1
    bs = Bootstrap(C, B, seed=7)
    got = bs.ratio(torch.from_numpy(num), torch.from_numpy(den)).numpy()
    idx = resample_indices(C, B, 7)
    loop = np.array([num[i].sum() / den[i].sum() for i in idx])  # one resample at a time
    _close(got, loop)
    iv = bs.interval(torch.from_numpy(got))
    assert iv is not None
    lo, hi = np.percentile(loop, [2.5, 97.5])
    assert iv.low == pytest.approx(lo, rel=1e-9) and iv.high == pytest.approx(hi, rel=1e-9)
    assert bs.info.n_contexts == C and bs.info.n_resamples == B
    assert bs.counts.sum(1).eq(C).all()  # every resample draws C contexts


def test_seed_and_counts() -> None:
    a, b, c = Bootstrap(9, 50, seed=3), Bootstrap(9, 50, seed=3), Bootstrap(9, 50, seed=4)
    assert torch.equal(a.counts, b.counts) and not torch.equal(a.counts, c.counts)
    with pytest.raises(MlsaeError):
        Bootstrap(0, 10)
    with pytest.raises(MlsaeError):
        a.sums(torch.zeros(8))


def test_total_variance_uses_the_resampled_mean() -> None:
    """FVU's denominator of a resample: the squared deviations from the resampled tokens' own
    per-dimension mean, from per-context moments; far from zero mean (no cancellation)."""
    g = torch.Generator().manual_seed(0)
    sizes = [5, 1, 8, 3, 6, 2]
    ctx = [torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.1 + 1e4 for n in sizes]
    n = torch.tensor([float(len(x)) for x in ctx])
    mean = torch.stack([x.mean(0) for x in ctx])
    m2 = torch.stack([(x - x.mean(0)).pow(2).sum() for x in ctx])
    bs = Bootstrap(len(ctx), 40, seed=2)
    got = total_variance(bs, n, mean, m2).numpy()
    ref = []
    for draw in resample_indices(len(ctx), 40, 2):
        x = torch.cat([ctx[i] for i in draw])
        ref.append(float((x - x.mean(0)).pow(2).sum()))
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-6)


def test_context_sums_fvu_against_plain_torch() -> None:
    """ContextSums fed in pieces (a context split over two updates, contexts out of order)
    gives each resample's FVU as recomputed from the resampled vectors."""
    g = torch.Generator().manual_seed(5)
    C, d = 7, 6
    tokens = [
        torch.randn(int(n), d, generator=g, dtype=torch.float64) + 3
        for n in torch.randint(2, 9, (C,), generator=g)
    ]
    recon = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in tokens]
    sums = ContextSums([4], d)
    for c in [3, 0, 6, 1, 5, 2, 4]:
        half = len(tokens[c]) // 2
        for sl in (slice(0, half), slice(half, None)):
            ids = torch.full((len(tokens[c][sl]),), c)
            sums.update(4, ids, tokens[c][sl], recon[c][sl])
    order = {c: c for c in range(C)}
    bs = Bootstrap(C, 30, seed=11)
    got = sums.aligned(order).fvu(bs)[:, 0].numpy()
    ref = []
    for draw in resample_indices(C, 30, 11):
        x = torch.cat([tokens[i] for i in draw])
        xh = torch.cat([recon[i] for i in draw])
        ref.append(float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-8)


def test_interval_covers_the_truth_statistically() -> None:
    """Coverage: over 200 synthetic data sets of 40 contexts, the 95% interval of a mean
    holds the true mean in 88-99% of them (a tolerance for B=500 and 200 trials)."""
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        x = rng.normal(1.0, 1.0, size=40)
        bs = Bootstrap(40, 500, seed=trial)
        iv = bs.interval(bs.ratio(torch.from_numpy(x), torch.ones(40, dtype=torch.float64)))
        assert iv is not None
        hits += iv.low <= 1.0 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_layer_stats_resamples_match_recomputing_on_the_resampled_contexts() -> None:
    """Every analysis statistic of a resample (vectorised, from per-context sums) equals
    LayerStats run from scratch on the resampled contexts' tokens."""
    from mlsae.analysis.layers import LayerStats
    from mlsae.core.stage_config import BootstrapConfig

    g = torch.Generator().manual_seed(3)
    C, T, layers, n_lat = 6, 5, [2, 5, 9], 7
    a = torch.rand(C, T, len(layers), n_lat, generator=g)
    a = a * (torch.rand(a.shape, generator=g) < 0.3)  # sparse, some latents dead in contexts
    a[2, :, :, 0] = 0  # latent 0 only outside context 2
    acc = LayerStats(n_lat, layers, boot=BootstrapConfig(bootstrap=25, bootstrap_seed=4))
    ids = torch.arange(C).repeat_interleave(T)
    acc.update_dense(a.reshape(C * T, len(layers), n_lat))  # without contexts: not kept
    assert acc.contexts is not None and not acc.contexts.row
    acc = LayerStats(n_lat, layers, boot=BootstrapConfig(bootstrap=25, bootstrap_seed=4))
    idx = torch.arange(n_lat).expand(C * T, len(layers), n_lat)
    acc.update(a.reshape(C * T, len(layers), n_lat), idx, contexts=ids)
    assert acc.contexts is not None
    bs = Bootstrap(C, 25, seed=4)
    got = acc.contexts._resampled(bs.counts)
    for b, draw in enumerate(resample_indices(C, 25, 4)):
        ref = LayerStats(n_lat, layers)
        for c in draw:
            ref.update_dense(a[c])
        r = ref.result()
        for key, val in got.items():
            assert float(val[b]) == pytest.approx(getattr(r, key), rel=1e-9, abs=1e-12), key
    res = acc.result()
    assert res.intervals is not None and res.intervals.bootstrap.n_contexts == C
    assert res.intervals.rel_var_latent is not None
