"""Native C++ kernels vs plain-torch references written from the definitions (values and
gradients), the build cache, and the choice of backend."""

from __future__ import annotations

import shutil

import pytest
import torch

from mlsae.core.errors import MlsaeError
from mlsae.sae import kernels, native

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def so():
    if native._compiler() is None:
        pytest.skip("no C++ compiler: the torch fallback is what runs here")
    return native.load(native.build())  # a build failure fails the test


def _check_topk(pre: torch.Tensor, k: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
    """Exact top-k: distinct columns, values = pre at those columns, and the multiset of values
    equals torch.topk's (NaN counted as the largest, as torch does)."""
    ref = pre.float().topk(k, dim=1).values
    got = vals.float().sort(1, descending=True).values
    nan_ref, nan_got = ref.isnan(), got.isnan()
    assert torch.equal(nan_ref.sum(1), nan_got.sum(1))
    assert torch.equal(got[~nan_got], ref.sort(1, descending=True).values[~nan_ref])
    g = pre.float().gather(1, idx)
    assert torch.equal(g.isnan(), vals.float().isnan())
    assert torch.equal(g[~g.isnan()], vals.float()[~g.isnan()])
    assert all(len(set(r.tolist())) == k for r in idx)


@pytest.mark.parametrize("k", [1, 5, 32])
def test_topk_random_and_ties(so, k):
    g = torch.Generator().manual_seed(k)
    pre = torch.randn(300, 1000, generator=g)
    pre[:40] = (pre[:40] * 2).round()  # heavy ties
    pre[50] = 0.0  # a constant row
    pre[51] = torch.arange(1000.0)  # ascending: every element enters the top-k
    pre[52] = -torch.arange(1000.0)
    pre[53, 7] = float("inf")
    pre[54] = float("-inf")
    _check_topk(pre, k, *native.topk(pre, k, so))


def test_topk_k_equals_width_small_width_and_nan(so):
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(20, 37, generator=g)
    _check_topk(pre, 37, *native.topk(pre, 37, so))  # k = d_sae
    _check_topk(pre, 3, *native.topk(pre, 3, so))  # too narrow for groups: heap path
    wide = torch.randn(6, 512, generator=g)
    wide[1, 100] = float("nan")
    wide[2, [3, 400]] = float("nan")
    _check_topk(wide, 8, *native.topk(wide, 8, so))


def test_topk_bf16_and_non_contiguous(so):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 800, generator=g)
    b16 = base.bfloat16()
    _check_topk(b16, 10, *native.topk(b16, 10, so))
    for view in (base[::2], base[:, 100:700], base.t().contiguous().t(), base[:, ::3]):
        _check_topk(view, 7, *native.topk(view, 7, so))


def test_topk_gathers_columns_in_the_same_pass(so):
    """AuxK's dead columns come out of the top-k pass: cols_out = pre[:, cols] exactly, for
    fp32, bf16 and strided rows, repeated and unsorted ids; bad ids raise."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(70, 600, generator=g)
    cols = torch.tensor([499, 0, 17, 17, 300])
    for pre in (base, base.bfloat16(), base[::2], base[:, 50:550]):
        out = torch.full((pre.shape[0], cols.numel()), float("nan"))
        vals, idx = native.topk(pre, 9, so, None, cols, out)
        assert torch.equal(out, pre.float()[:, cols])
        _check_topk(pre, 9, vals, idx)
    with pytest.raises(IndexError):
        native.topk(base, 3, so, None, torch.tensor([600]), torch.empty(70, 1))


def test_segments_equal_stable_sort(so):
    g = torch.Generator().manual_seed(3)
    m, k = 50, 4
    idx = torch.randint(0, m, (30, k), generator=g)
    offsets, order = native.segments(idx, m, so)
    assert torch.equal(order, torch.sort(idx.reshape(-1), stable=True).indices)
    counts = torch.bincount(idx.reshape(-1), minlength=m)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    with pytest.raises(MlsaeError, match="out of range"):
        native.segments(idx + m, m, so)


@pytest.mark.parametrize("d", [7, 32, 77])  # below, at and not a multiple of the column block
def test_segment_sum_row_dots_vs_dense(so, d):
    g = torch.Generator().manual_seed(d)
    n, m, k = 45, 300, 6
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :k]  # distinct per row
    idx[0] = idx[1]  # two rows on the same latents
    w = torch.randn(n, k, generator=g)
    table_n, table_m = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    dense = torch.zeros(n, m).scatter_(1, idx, w)  # [n, m] sparse code
    offsets, order = native.segments(idx, m, so)
    out, cols = native.segment_sum(offsets, order, k, w, table_n, so)
    torch.testing.assert_close(out, dense.t() @ table_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols, dense.sum(0), rtol=1e-5, atol=1e-5)
    out_t, _ = native.segment_sum(offsets, order, k, w, table_n, so, transposed=True)
    assert out_t.is_contiguous() and out_t.shape == (d, m)
    torch.testing.assert_close(out_t, (dense.t() @ table_n).t(), rtol=1e-5, atol=1e-5)
    inactive = torch.ones(m, dtype=torch.bool)
    inactive[idx.unique()] = False
    assert inactive.any() and out[inactive].abs().max() == 0
    go = torch.randn(n, d, generator=g)
    torch.testing.assert_close(
        native.row_dots(go, idx, table_m, so),
        (go @ table_m.t()).gather(1, idx),
        rtol=1e-5,
        atol=1e-5,
    )


def test_row_dots_non_contiguous_inputs(so):
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(10, 18, generator=g)[:, ::2]  # [10, 9] strided
    idx = torch.randint(0, 30, (4, 10), generator=g).t()  # [10, 4] transposed view
    table = torch.randn(9, 30, generator=g).t()  # [30, 9] transposed view
    ref = (grad.unsqueeze(1) * table[idx]).sum(2)
    torch.testing.assert_close(native.row_dots(grad, idx, table, so), ref, rtol=1e-5, atol=1e-5)


def test_build_is_cached_and_backend_choice(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    lib = native.build(tmp_path)
    assert lib.is_file() and lib.parent == tmp_path
    mtime = lib.stat().st_mtime_ns
    assert native.build(tmp_path) == lib and lib.stat().st_mtime_ns == mtime  # no rebuild
    assert not list(tmp_path.glob(".build-*"))  # no temp files left behind
    monkeypatch.setenv(native.ENV, "torch")
    assert native.library.__wrapped__() is None
    monkeypatch.setenv(native.ENV, "bogus")
    with pytest.raises(MlsaeError, match="MLSAE_KERNELS"):
        native.library.__wrapped__()


def test_missing_compiler_falls_back_to_torch(monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv(native.ENV, "auto")
    assert native.library.__wrapped__() is None
    assert "torch" in caplog.text and "no C++ compiler" in caplog.text
    monkeypatch.setenv(native.ENV, "native")
    with pytest.raises(MlsaeError, match="native SAE kernels unavailable"):
        native.library.__wrapped__()


def test_forced_torch_switches_every_kernel():
    with native.forced_torch():
        assert native.backend() == "torch" and native.active() is None
        pre = torch.randn(70, 512)
        v, i = kernels.topk(pre, 8)
        assert torch.equal(v.sort(1).values, pre.topk(8).values.sort(1).values)
    if shutil.which("g++") and native.library() is not None:
        assert native.backend() == "native"


@pytest.mark.parametrize("openmp", [True, False])
def test_thread_pools_equal_the_references(tmp_path, monkeypatch, openmp):
    """Built with OpenMP (torch's libgomp) and without (std::threads: what a process whose torch
    runs on another OpenMP runtime gets), on 2 and 3 threads: many chunks per call, the same
    results as the references."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    if not openmp:
        monkeypatch.setattr(native, "torch_libgomp", lambda: False)
    so = native.load(native.build(tmp_path))
    if openmp and not so.mlsae_openmp():
        pytest.skip("this compiler builds without OpenMP: the std::thread case covers it")
    assert so.mlsae_openmp() == int(openmp)
    g = torch.Generator().manual_seed(9)
    n, m, k, d = 300, 640, 12, 40
    pre = torch.randn(n, m, generator=g)
    w, table = torch.randn(n, k, generator=g), torch.randn(n, d, generator=g)
    for threads in (2, 3):
        monkeypatch.setattr(native, "_threads", lambda t=threads: t)
        vals, idx = native.topk(pre, k, so)
        _check_topk(pre, k, vals, idx)
        dense = torch.zeros(n, m).scatter_(1, idx, w)
        offsets, order = native.segments(idx, m, so)
        out_t, _ = native.segment_sum(offsets, order, k, w, table, so, transposed=True)
        torch.testing.assert_close(out_t, table.t() @ dense, rtol=1e-5, atol=1e-5)
        table_m, go = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g)
        torch.testing.assert_close(
            native.row_dots(go, idx, table_m, so),
            (go @ table_m.t()).gather(1, idx),
            rtol=1e-5,
            atol=1e-5,
        )


def test_build_falls_back_without_openmp_and_reports_failures(tmp_path, monkeypatch):
    """A compiler that rejects the OpenMP flag still builds (std::threads); a source that does
    not compile is one clear error, and no temp file is left."""
    if native._compiler() is None or not native.torch_libgomp():
        pytest.skip("needs g++ and torch on libgomp")
    monkeypatch.setattr(native, "OPENMP", ["-fno-such-openmp-flag"])
    so = native.load(native.build(tmp_path / "a"))
    assert so.mlsae_openmp() == 0
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(MlsaeError, match="building the native kernels failed"):
        native.build(tmp_path / "b")
    assert not list((tmp_path / "b").glob("*"))
