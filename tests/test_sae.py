"""The SAE against slow plain-torch references and hand-worked cases; files and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import mlsae
from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import SparseAutoencoder, geometric_median
from mlsae.sae.folders import load_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(d=10, r=4, k=3, normalize="standardize", seed=0) -> SparseAutoencoder:
    sae = SparseAutoencoder(
        SaeConfig(d_in=d, expansion_factor=r, k=k, normalize=normalize, layers=[1, 2]),
        seed=seed,
        compute_dtype=torch.float32,
    )
    with torch.no_grad():  # non-trivial biases so every term is exercised
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _slow_reference(sae: SparseAutoencoder, x: torch.Tensor):
    """Per-vector loop in plain Python/torch: (x_hat, list of {latent: act})."""
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()  # noqa: N806
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()  # noqa: N806
    d = x.shape[1]
    outs, codes = [], []
    for row in x:
        if sae.cfg.normalize == "standardize":
            mu = sum(row.tolist()) / d
            sd = math.sqrt(sum((v - mu) ** 2 for v in row.tolist()) / (d - 1)) + 1e-5
        else:
            mu, sd = 0.0, 1.0
        u = (row - mu) / sd
        pre = [float((u - b_dec) @ W_enc[:, j] + b_enc[j]) for j in range(W_enc.shape[1])]
        keep = sorted(range(len(pre)), key=lambda j: -pre[j])[: sae.cfg.k]
        code = {j: max(pre[j], 0.0) for j in keep}
        u_hat = b_dec.clone()
        for j, a in code.items():
            u_hat += a * W_dec[j]
        outs.append(u_hat * sd + mu)
        codes.append(code)
    return torch.stack(outs), codes


@pytest.mark.parametrize("normalize", ["standardize", "none"])
def test_encode_decode_forward_equal_slow_reference(normalize):
    torch.manual_seed(0)
    sae = _sae(normalize=normalize)
    x = torch.randn(25, 10) * 3 + 2
    x_ref, codes = _slow_reference(sae, x)
    enc = sae.encode(x)
    assert enc.top_acts.shape == (25, 3) and enc.top_indices.dtype == torch.int64
    assert enc.mean.shape == (25, 1) and enc.std.shape == (25, 1)
    for n, code in enumerate(codes):
        got = dict(zip(enc.top_indices[n].tolist(), enc.top_acts[n].tolist(), strict=True))
        assert got.keys() == code.keys()
        for j in code:
            assert got[j] == pytest.approx(code[j], abs=1e-5)
    torch.testing.assert_close(sae.decode(enc), x_ref, rtol=1e-5, atol=1e-5)
    x_hat, enc2 = sae(x)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-5, atol=1e-5)
    dense = sae.dense_acts(enc2)
    assert dense.shape == (25, 40)
    for n, code in enumerate(codes):
        want = torch.zeros(40)
        for j, a in code.items():
            want[j] = a
        torch.testing.assert_close(dense[n], want, rtol=1e-5, atol=1e-5)


def test_chunked_no_grad_encode_equals_one_pass(monkeypatch):
    import mlsae.sae.autoencoder as sae_mod

    sae = _sae()
    x = torch.randn(50, 10)
    ref = sae.encode(x)  # grad enabled: one pass
    monkeypatch.setattr(sae_mod, "ENCODE_CHUNK", 16)
    with torch.no_grad():
        got = sae.encode(x)
    torch.testing.assert_close(got.top_acts, ref.top_acts.detach())
    assert torch.equal(got.top_indices, ref.top_indices)


def test_init_decoder_is_unit_norm_encoder_transpose():
    sae = SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=2, k=2), seed=3)
    assert all(p.is_contiguous() for p in sae.parameters())  # row gathers need row-major
    W_enc = sae.W_enc.detach()  # noqa: N806
    torch.testing.assert_close(sae.W_dec.detach(), (W_enc / W_enc.norm(dim=0)).t())
    assert sae.b_enc.abs().max() == 0
    assert not torch.equal(W_enc, SparseAutoencoder(sae.cfg, seed=4).W_enc.detach())


def test_auxk_hand_computed():
    """d = m = 4, k = 1, W_enc = W_dec = I, biases 0, no normalization; latents 2, 3 dead.

    x0 = [3, 1, 2, -1]: top-1 latent 0 -> u_hat [3,0,0,0], e = [0,1,2,-1]; best dead latent 2
    (value 2) -> e_hat [0,0,2,0]. x1 = [0, 4, -2, 1]: latent 1 -> e = [0,0,-2,1]; dead
    pre-acts (-2, 1) -> latent 3 -> e_hat [0,0,0,1].
    ||e - e_hat||^2 = 1 + 1 + 4 = 6; mean(e) = [0, .5, 0, 0]; ||e - mean||^2 = 10.5 -> 4/7.
    FVU: err = 6 + 5 = 11; x - mean(x) = +-[1.5, -1.5, 2, -1] -> 19 -> 11/19.
    """
    sae = SparseAutoencoder(
        SaeConfig(d_in=4, expansion_factor=1, k=1, normalize="none"), compute_dtype=torch.float32
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[3.0, 1, 2, -1], [0, 4, -2, 1]])
    out = sae.train_step_forward(x, torch.tensor([2, 3]), k_aux=1, aux_coef=0.5)
    assert out.fvu.item() == pytest.approx(11 / 19, rel=1e-6)
    assert out.auxk.item() == pytest.approx(4 / 7, rel=1e-6)
    assert out.loss.item() == pytest.approx(11 / 19 + 0.5 * 4 / 7, rel=1e-6)
    none = sae.train_step_forward(x, torch.tensor([], dtype=torch.int64), k_aux=1, aux_coef=0.5)
    assert none.auxk.item() == 0 and none.loss.item() == pytest.approx(11 / 19, rel=1e-6)


@pytest.mark.parametrize("k_aux", [5, 16])  # fewer / more than the 7 dead latents
def test_training_loss_gradients_equal_dense_autograd(k_aux):
    torch.manual_seed(1)
    sae = _sae(d=12, r=6, k=4)
    with torch.no_grad():
        sae.b_enc.sub_(0.8)  # some selected pre-activations < 0: the ReLU matters
    x = torch.randn(30, 12) * 2 + 1
    dead = torch.tensor([0, 7, 9, 20, 33, 50, 71])
    out = sae.train_step_forward(x, dead, k_aux=k_aux, aux_coef=0.25)
    out.loss.backward()
    P = [p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]  # noqa: N806
    W_enc, b_enc, W_dec, b_dec = P  # noqa: N806
    u = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)
    pre = (u - b_dec) @ W_enc + b_enc
    v, i = pre.topk(4, dim=1)
    u_hat = torch.zeros_like(pre).scatter(1, i, v.relu()) @ W_dec + b_dec
    fvu = (u - u_hat).pow(2).sum() / (u - u.mean(0)).pow(2).sum()
    mask = torch.full((pre.shape[1],), float("-inf"))
    mask[dead] = 0
    av, ai = (pre + mask).topk(min(k_aux, 7), dim=1)
    e = (u - u_hat).detach()
    e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ W_dec
    auxk = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (fvu + 0.25 * auxk).backward()
    assert out.fvu.item() == pytest.approx(fvu.item(), rel=1e-5, abs=1e-6)
    assert out.auxk.item() == pytest.approx(auxk.item(), rel=1e-5, abs=1e-6)
    for p, ref in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), P, strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6)


def test_decoder_rows_unit_norm_after_steps_and_parallel_grad_removed():
    from mlsae.core.config import TrainConfig
    from mlsae.train.member import make_adam

    torch.manual_seed(0)
    sae = _sae(d=16, r=4, k=4)
    opt = make_adam(sae.parameters(), TrainConfig(lr=1e-2))
    for _ in range(5):
        opt.zero_grad()
        sae.train_step_forward(torch.randn(64, 16)).loss.backward()
        sae.remove_parallel_grad_()
        along = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert along.abs().max() < 1e-6
        opt.step()
        assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # the step moved off the sphere
        sae.normalize_decoder_()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)


def test_geometric_median_weiszfeld():
    torch.manual_seed(0)
    pts = torch.randn(300, 5) + torch.tensor([5.0, 0, 0, 0, 0])
    pts[:20] += 100  # outliers move the mean, barely the median
    y = geometric_median(pts)
    unit = (y - pts) / (y - pts).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-2  # optimality: the unit vectors to the points cancel
    f = lambda c: (pts - c).norm(dim=1).sum()  # noqa: E731
    for _ in range(20):
        assert f(y) <= f(y + 0.05 * torch.randn(5))
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3)]])  # Fermat point = centroid
    torch.testing.assert_close(geometric_median(tri), tri.mean(0), rtol=0, atol=1e-5)


def test_init_b_dec_is_median_in_normalized_space():
    sae = _sae()
    x = torch.randn(50, 10) * 4 + 3
    sae.init_b_dec(x)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(sae.normalize(x)[0]))


def test_save_load_roundtrip(tmp_path):
    sae = _sae()
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "k", "layers", "normalize", "model", "dataset", "lens"):
        assert key in cfg
    assert cfg["d_sae"] == 40 and cfg["layers"] == [1, 2]
    t = load_file(str(tmp_path / "s" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "W_enc": (10, 40),
        "b_enc": (40,),
        "W_dec": (40, 10),
        "b_dec": (10,),
    }
    back = mlsae.load_sae(tmp_path / "s")
    assert not back.training and back.cfg == sae.cfg
    assert all(p.is_contiguous() for p in back.parameters())
    x = torch.randn(7, 10)
    torch.testing.assert_close(back(x)[0], sae(x)[0].detach())
    sae.save(tmp_path / "s")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_load_errors(tmp_path):
    with pytest.raises(MlsaeError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlsaeError, match="holds no SAE"):
        load_sae(tmp_path / "empty")
    _sae().save(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(MlsaeError, match="unreadable weights"):
        load_sae(tmp_path / "a")
    _sae().save(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").write_text("{not json")
    with pytest.raises(MlsaeError, match="unreadable SAE config"):
        load_sae(tmp_path / "b")
    _sae().save(tmp_path / "c")
    save_file({"W_enc": torch.zeros(3, 3)}, str(tmp_path / "c" / "sae.safetensors"))
    with pytest.raises(MlsaeError, match="does not match"):
        load_sae(tmp_path / "c")


def test_bad_shapes():
    with pytest.raises(MlsaeError, match="-k 50 must be between 1 and d_sae = 40"):
        SparseAutoencoder(SaeConfig(d_in=10, expansion_factor=4, k=50))
    with pytest.raises(MlsaeError, match="d_in = 10"):
        _sae().encode(torch.randn(3, 11))


def test_bf16_compute_close_to_fp32():
    sae = _sae(d=16, r=4, k=4)
    x = torch.randn(32, 16)
    ref = sae(x)[0]
    sae.compute_dtype = torch.bfloat16
    got = sae(x)[0]
    assert (got - ref).norm() / ref.norm() < 0.1


def test_load_survives_a_kill_between_the_two_renames(tmp_path):
    sae = _sae()
    sae.save(tmp_path / "s")
    (tmp_path / "s").rename(tmp_path / ".s.old")  # state after the first rename of a re-save
    back = load_sae(tmp_path / "s")
    torch.testing.assert_close(back.W_dec, sae.W_dec.detach())


def test_bf16_training_step_close_to_fp32():
    """The AMX path (bf16 encoder matmul, fp32 master weights and gradients) on a small case."""
    torch.manual_seed(0)
    sae = _sae(d=16, r=4, k=4)
    x = torch.randn(64, 16)
    grads = []
    for dt in (torch.float32, torch.bfloat16):
        sae.compute_dtype = dt
        sae.zero_grad()
        sae.train_step_forward(x, torch.tensor([1, 2, 3]), k_aux=2, aux_coef=0.5).loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in sae.parameters()]))
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.1
