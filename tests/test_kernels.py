"""Fast kernels vs dense plain-torch computations (values and autograd gradients)."""

from __future__ import annotations

import pytest
import torch

from mlsae.sae import kernels, native
from mlsae.sae.encoder import plain_encode, topk_encode
from mlsae.sae.kernels import latent_segments, segment_sum, sparse_decode, topk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Run a test with the native kernels and with the pure-torch fallback."""
    if request.param == "torch":
        with native.forced_torch():
            yield "torch"
        return
    if native.library() is None:
        pytest.skip("native kernels unavailable here (no compiler)")
    kernels._SEG_MEMO[:] = [None, None]
    yield "native"


def _unique_idx(n: int, m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, m, generator=g).argsort(1)[:, :k]  # [n, k] distinct per row


@pytest.mark.parametrize("method", ["torch", "grouped", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_exact(method, dtype, backend):
    torch.manual_seed(0)
    pre = torch.randn(200, 512).to(dtype)
    pre[:5] = pre[:5].round()  # heavy ties in a few rows
    pre[7, :] = 0.0  # a constant row
    v, i = topk(pre, 8, method)
    ref = pre.float().sort(1, descending=True).values[:, :8]
    assert torch.equal(v.float().sort(1, descending=True).values, ref)
    assert torch.equal(pre.gather(1, i), v)
    assert all(len(set(r.tolist())) == 8 for r in i)  # distinct columns


def test_topk_grouped_fallback_shapes():
    pre = torch.randn(70, 101)  # d_sae not divisible by the group size -> torch.topk
    v, i = topk(pre, 5, "grouped")
    assert torch.equal(v.sort(1, descending=True).values, pre.topk(5).values)


def test_grouped_topk_really_groups():
    """The grouped path is taken (not the fallback) for bench-like shapes."""
    assert kernels._grouped_ok(4608, 32, kernels.TOPK_GROUP)
    pre = torch.randn(128, 4608)
    v, i = topk(pre, 32, "grouped")
    assert torch.equal(v.sort(1, descending=True).values, pre.topk(32).values)


def test_segment_sum_equals_dense_transpose_product(backend):
    n, m, k, d = 50, 40, 6, 7
    idx = _unique_idx(n, m, k)
    w = torch.randn(n, k)
    table = torch.randn(n, d)
    dense = torch.zeros(n, m).scatter_(1, idx, w)  # [n, m]
    seg = latent_segments(idx, m)
    got, cols = segment_sum(seg, table, w)
    torch.testing.assert_close(got, dense.t() @ table, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols, dense.sum(0), rtol=1e-5, atol=1e-5)
    got_t, _ = segment_sum(seg, table, w, transposed=True)
    assert got_t.is_contiguous()
    torch.testing.assert_close(got_t, table.t() @ dense, rtol=1e-5, atol=1e-5)


def test_sparse_decode_forward_backward_vs_dense(backend):
    n, m, k, d = 33, 60, 5, 9
    idx = _unique_idx(n, m, k, 1)
    acts = torch.rand(n, k, requires_grad=True)
    W = torch.randn(m, d, requires_grad=True)  # noqa: N806
    go = torch.randn(n, d)
    out = sparse_decode(acts, idx, W)
    out.backward(go)
    a2, W2 = acts.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()  # noqa: N806
    z = torch.zeros(n, m).scatter(1, idx, a2)  # dense code
    ref = z @ W2
    ref.backward(go)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts.grad, a2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-5, atol=1e-5)
    inactive = torch.ones(m, dtype=torch.bool)
    inactive[idx.unique()] = False
    assert inactive.any() and W.grad[inactive].abs().max() == 0


def test_sparse_decode_aux_shares_one_weight_gradient(backend):
    """The main sparse decode and AuxK's dense decode in one node: both outputs and every
    gradient equal a dense autograd reference; without aux ids the second output is [N, 0]."""
    from mlsae.sae.kernels import sparse_decode_aux

    n, m, k, d = 40, 50, 4, 7
    idx = _unique_idx(n, m, k, 2)
    ids = torch.tensor([3, 17, 44, 8])
    acts = torch.rand(n, k, requires_grad=True)
    aux = torch.randn(n, ids.numel()).relu().requires_grad_()
    W = torch.randn(m, d, requires_grad=True)  # noqa: N806
    g1, g2 = torch.randn(n, d), torch.randn(n, d)
    out, e_hat = sparse_decode_aux(acts, idx, W, aux, ids)
    (out * g1 + e_hat * g2).sum().backward()
    P = [t.detach().clone().requires_grad_() for t in (acts, aux, W)]  # noqa: N806
    ref = torch.zeros(n, m).scatter(1, idx, P[0]) @ P[2]
    ref_e = P[1] @ P[2][ids]
    (ref * g1 + ref_e * g2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e_hat, ref_e, rtol=1e-5, atol=1e-5)
    for got, want in zip((acts, aux, W), P, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    assert sparse_decode_aux(acts, idx, W)[1].shape == (n, 0)


@pytest.mark.parametrize(("with_dead", "k"), [(False, 6), (True, 6), (False, 1), (True, 96)])
def test_topk_encode_vs_dense_autograd(with_dead, k, backend):
    torch.manual_seed(3)
    n, d, m = 40, 12, 96
    u = torch.randn(n, d, requires_grad=True)
    b_dec = torch.randn(d, requires_grad=True)
    W = torch.randn(d, m, requires_grad=True)  # noqa: N806
    b_enc = (torch.randn(m) - 6).requires_grad_()  # some selected pre-activations < 0
    dead = torch.tensor([3, 5, 17, 40, 41, 42, 60, 77, 90, 91, 92, 95])
    enc = topk_encode(u, b_dec, W, b_enc, k, torch.float32, dead if with_dead else None)
    if k == 6:
        assert 0 < (enc.acts == 0).float().mean() < 0.5  # the ReLU after the top-k matters
    ga, gd = torch.randn(n, k), torch.randn(n, enc.dead_pre.shape[1])
    loss = (enc.acts * ga).sum() + (enc.dead_pre * gd).sum()
    loss.backward()

    leaves = [t.detach().clone().requires_grad_() for t in (u, b_dec, W, b_enc)]
    u2, bd2, W2, be2 = leaves  # noqa: N806
    pre = (u2 - bd2) @ W2 + be2  # dense [n, m]
    v, i = pre.topk(k, dim=1)
    # match the kernel's slot order so the random upstream gradients line up
    perm = (enc.idx.unsqueeze(2) == i.unsqueeze(1)).float().argmax(2)  # kernel slot -> ref slot
    assert torch.equal(i.gather(1, perm), enc.idx)
    ref = v.gather(1, perm).relu()
    torch.testing.assert_close(enc.acts, ref.detach(), rtol=1e-5, atol=1e-5)
    loss2 = (ref * ga).sum()
    if with_dead:
        torch.testing.assert_close(enc.dead_pre, pre[:, dead].detach(), rtol=1e-5, atol=1e-5)
        loss2 = loss2 + (pre[:, dead] * gd).sum()
    else:
        assert enc.dead_pre.shape == (n, 0)
    loss2.backward()
    for got, want in zip((u, b_dec, W, b_enc), leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_empty_dead_set_and_non_contiguous_inputs(backend):
    """dead = [] gives no dead columns; strided views of u / W give the contiguous results."""
    torch.manual_seed(4)
    n, d, m, k = 30, 10, 64, 5
    u_big, w_big = torch.randn(n, 2 * d), torch.randn(m, d)
    u, W = u_big[:, ::2], w_big.t()  # noqa: N806 - non-contiguous [n, d] and [d, m]
    b_dec, b_enc = torch.randn(d), torch.randn(m)
    params = [t.clone().requires_grad_() for t in (b_dec, W, b_enc)]
    enc = topk_encode(u, *params[:2], params[2], k, torch.float32, torch.zeros(0, dtype=torch.long))
    assert enc.dead_pre.shape == (n, 0)
    (enc.acts * torch.arange(k)).sum().backward()
    ref_params = [t.clone().requires_grad_() for t in (b_dec, W.contiguous(), b_enc)]
    ref = topk_encode(u.contiguous(), *ref_params[:2], ref_params[2], k)
    perm = (enc.idx.unsqueeze(2) == ref.idx.unsqueeze(1)).float().argmax(2)
    torch.testing.assert_close(enc.acts, ref.acts.gather(1, perm))
    (ref.acts.gather(1, perm) * torch.arange(k)).sum().backward()
    for got, want in zip(params, ref_params, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


def test_train_step_native_equals_torch_backend():
    """A whole training forward/backward (AuxK on) gives the same loss and gradients with
    both backends."""
    if native.library() is None:
        pytest.skip("native kernels unavailable here")
    from mlsae.core.config import SaeConfig
    from mlsae.sae.autoencoder import SparseAutoencoder

    torch.manual_seed(5)
    x = torch.randn(300, 16) * 2 + 1
    dead = torch.tensor([1, 5, 9, 30, 31, 60])
    grads = []
    for forced in (False, True):
        sae = SparseAutoencoder(SaeConfig(d_in=16, expansion_factor=4, k=4), seed=0)
        kernels._SEG_MEMO[:] = [None, None]
        if forced:
            with native.forced_torch():
                out = sae.train_step_forward(x, dead, 3, 1 / 32)
                out.loss.backward()
        else:
            out = sae.train_step_forward(x, dead, 3, 1 / 32)
            out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2)
    for name in g1:
        assert g1[name].is_contiguous() == g2[name].is_contiguous() or name == "W_enc"
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6)


def test_bf16_compute_dtype_matches_bf16_reference():
    torch.manual_seed(0)
    u, W, b = torch.randn(16, 8), torch.randn(8, 64), torch.randn(64)  # noqa: N806
    enc = topk_encode(u, torch.zeros(8), W, b, 4, torch.bfloat16)
    pre = torch.addmm(b.bfloat16(), u.bfloat16(), W.bfloat16()).float()
    ref = pre.topk(4).values.relu()
    torch.testing.assert_close(enc.acts.sort(1, descending=True).values, ref)


def test_kept_tile_buffer_across_modes_and_shapes(backend):
    """The encoder's tile buffer is kept between calls: encodes in inference mode, then with
    gradients, then of another width, each equal to the plain-torch encoder's."""
    torch.manual_seed(6)
    u, b_dec = torch.randn(40, 12), torch.randn(12)
    for mode, m in ((torch.inference_mode, 48), (torch.enable_grad, 48), (torch.no_grad, 80)):
        W, b_enc = torch.randn(12, m), torch.randn(m)  # noqa: N806
        with mode():
            enc = topk_encode(u, b_dec, W, b_enc, 5)
            ref = plain_encode(u, b_dec, W, b_enc, 5)
        got = enc.acts.gather(1, enc.idx.argsort(1))
        want = ref.acts.gather(1, ref.idx.argsort(1))
        assert torch.equal(enc.idx.sort(1).values, ref.idx.sort(1).values)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k_aux", [3, 40])
def test_sparse_auxk_equals_dense_auxk(backend, monkeypatch, k_aux):
    """Many dead latents: AuxK as sparse entries gives the dense path's loss and gradients
    (dead latents that are also in the main top-k included; k_aux >= #dead takes them all)."""
    from mlsae.core.config import SaeConfig
    from mlsae.sae import topk
    from mlsae.sae.autoencoder import SparseAutoencoder

    torch.manual_seed(7)
    x = torch.randn(200, 16) * 2 + 1
    dead = torch.arange(0, 64, 2)[:30]  # 30 of 64 latents, half of every row's candidates
    res = []
    for ratio in (0, 10**9):  # sparse, then dense
        monkeypatch.setattr(topk, "AUX_SPARSE_RATIO", ratio)
        sae = SparseAutoencoder(SaeConfig(d_in=16, expansion_factor=4, k=4), seed=0)
        kernels._SEG_MEMO[:] = [None, None]
        out = sae.train_step_forward(x, dead, k_aux, 1 / 32)
        out.loss.backward()
        assert float(out.auxk.detach()) > 0
        res.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (o1, g1), (o2, g2) = res
    assert bool(torch.isin(o1.top_indices, dead).any())  # some dead latents also fired
    for a, b in ((o1.loss, o2.loss), (o1.fvu, o2.fvu), (o1.auxk, o2.auxk)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6)
