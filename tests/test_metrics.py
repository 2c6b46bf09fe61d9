"""Streaming evaluation metrics against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae.sae.metrics import LayerMetrics, fvu, mean_or_none


def _data(n=500, d=12, d_sae=40, k=5, seed=0, offset=None):
    g = np.random.default_rng(seed)
    offset = g.normal(0, 10, size=d) if offset is None else offset  # per-dim means differ
    x = offset + g.normal(0, 1, size=(n, d)) * g.uniform(0.5, 2, size=d)
    x_hat = x + 0.3 * g.normal(size=(n, d))
    idx = np.stack([g.choice(d_sae // 2, size=k, replace=False) for _ in range(n)])  # half used
    acts = np.maximum(g.normal(size=(n, k)), 0)  # some exact zeros: inactive
    return x, x_hat, idx, acts


def _np_metrics(x, x_hat, idx, acts):
    err = ((x - x_hat) ** 2).sum()
    return {
        "fvu": err / ((x - x.mean(0)) ** 2).sum(),
        "fvu_grand": err / ((x - x.mean()) ** 2).sum(),
        "mse": ((x - x_hat) ** 2).mean(),
        "l0": (acts > 0).sum(1).mean(),
    }


def _t(a):
    return torch.as_tensor(a, dtype=torch.float32)


def test_matches_numpy_and_per_dim_mean():
    x, x_hat, idx, acts = _data()
    m = LayerMetrics([3], d_in=12, d_sae=40)
    m.update(3, _t(x), _t(x_hat), torch.as_tensor(idx), _t(acts))
    ref = _np_metrics(x.astype(np.float32), x_hat.astype(np.float32), idx, acts)
    per = m.per_layer()
    assert per["fvu"][0] == pytest.approx(ref["fvu"], rel=1e-5)
    assert per["mse"][0] == pytest.approx(ref["mse"], rel=1e-5)
    assert per["l0"][0] == pytest.approx(ref["l0"], rel=1e-12)
    # the per-dimension mean is not the grand mean: here they differ by a large factor
    assert ref["fvu_grand"] < 0.1 * ref["fvu"]
    assert per["fvu"][0] != pytest.approx(ref["fvu_grand"], rel=1e-2)
    # the batch FVU (training loss) agrees
    assert float(fvu(_t(x).double(), _t(x_hat).double())) == pytest.approx(ref["fvu"], rel=1e-6)


def test_streaming_equals_one_shot_per_layer():
    data = {layer: _data(seed=layer) for layer in (0, 5)}
    one = LayerMetrics([0, 5], 12, 40)
    many = LayerMetrics([0, 5], 12, 40)
    for layer, (x, x_hat, idx, acts) in data.items():
        one.update(layer, _t(x), _t(x_hat), torch.as_tensor(idx), _t(acts))
        for sl in np.array_split(np.arange(len(x)), [1, 7, 100, 101, 333]):  # uneven, incl. 1
            many.update(layer, _t(x[sl]), _t(x_hat[sl]), torch.as_tensor(idx[sl]), _t(acts[sl]))
    a, b = one.result(), many.result()
    for key in ("fvu", "mse", "l0"):
        np.testing.assert_allclose(a.per_layer[key], b.per_layer[key], rtol=1e-9)
        ref = [_np_metrics(*[np.asarray(v, np.float32) for v in data[x]])[key] for x in (0, 5)]
        np.testing.assert_allclose(a.per_layer[key], ref, rtol=1e-5)
        assert a.mean[key] == pytest.approx(np.mean(ref), rel=1e-5)
    assert a.n_tokens == b.n_tokens == 500
    assert a.layers == [0, 5]


def test_large_offset_is_stable():
    """|mean| >> std: a naive sum-of-squares in float32 would lose the variance entirely."""
    x, x_hat, idx, acts = _data(offset=np.full(12, 3e4))
    m = LayerMetrics([0], 12, 40)
    for sl in np.array_split(np.arange(len(x)), 9):
        m.update(0, torch.as_tensor(x[sl]), torch.as_tensor(x_hat[sl]))
    ref = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m.per_layer()["fvu"][0] == pytest.approx(ref, rel=1e-6)


def test_dead_fraction_and_activity():
    x, x_hat, idx, acts = _data()
    m = LayerMetrics([1, 2], 12, 40)
    m.update(1, _t(x), _t(x_hat), torch.as_tensor(idx), _t(acts))
    extra = np.array([[30, 31, 32, 33, 34]])  # layer 2 wakes up 5 more latents, one at 0
    m.update(2, _t(x[:1]), _t(x_hat[:1]), torch.as_tensor(extra), _t([[1, 1, 1, 1, 0]]))
    active = set(idx[acts > 0].tolist())
    assert m.dead_fraction([1]) == pytest.approx(1 - len(active) / 40)
    assert m.dead_fraction() == pytest.approx(1 - len(active | {30, 31, 32, 33}) / 40)
    np.testing.assert_array_equal(m.counts[0].numpy(), np.bincount(idx[acts > 0], minlength=40))


def test_splice_sums_and_missing_values():
    m = LayerMetrics([0, 1], 4, 8)
    m.update_splice(0, ce_sum=3.0, kl_sum=1.0, n=10)
    m.update_splice(0, ce_sum=1.0, kl_sum=1.0, n=10)
    per = m.per_layer()
    assert per["delta_ce"] == [pytest.approx(0.2), None]
    assert per["kl"] == [pytest.approx(0.1), None]
    assert per["fvu"] == [None, None]
    assert mean_or_none(per["delta_ce"]) == pytest.approx(0.2)
    assert mean_or_none([None, float("nan")]) is None


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_batch_fvu_gradients_equal_the_plain_formula(x_needs_grad):
    """The training loss's fused ops: the same value and gradients (to x_hat, and to x when it
    needs them) as autograd through the squares summed."""
    x0, xh0, _, _ = _data(seed=3)
    grads = []
    for fused in (True, False):
        x = torch.tensor(x0).requires_grad_(x_needs_grad)
        x_hat = torch.tensor(xh0, requires_grad=True)
        if fused:
            loss = fvu(x, x_hat)
        else:
            loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0, keepdim=True)) ** 2).sum()
        loss.backward()
        grads.append((loss.detach(), x_hat.grad, x.grad))
    (l1, gh1, gx1), (l2, gh2, gx2) = grads
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh1, gh2, rtol=1e-10, atol=1e-14)
    if x_needs_grad:
        torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-14)
    else:
        assert gx1 is None and gx2 is None
