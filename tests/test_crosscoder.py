"""The acausal crosscoder (mlsae.sae.crosscoder): its training loss, code and gradients against a
dense plain-torch reference over [L, d, F] / [F, L, d] weights, the per-(token, layer) code of the
stage contract, save / load, a resumed run equal to an uninterrupted one, and the stages that
refuse it in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_architectures import _cache, _fvu, _normalize, _train

from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.crosscoder import CrosscoderSAE
from mlsae.sae.folders import load_sae
from mlsae.train.loop import train_command

pytestmark = pytest.mark.usefixtures("one_thread")

L, D, R, K = 3, 12, 6, 2
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _xc(seed: int = 0) -> CrosscoderSAE:
    cfg = SaeConfig(d_in=D, expansion_factor=R, k=K, layers=[0, 2, 5], architecture="crosscoder")
    sae = SparseAutoencoder(cfg, seed=seed, compute_dtype=torch.float32)
    assert isinstance(sae, CrosscoderSAE)
    with torch.no_grad():  # non-trivial biases; some selected pre-activations < 0
        sae.b_enc.normal_(0, 0.3).sub_(0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _weights(sae: CrosscoderSAE) -> list[torch.Tensor]:
    """W_enc [L, d, F], b_enc [F], W_dec [F, L, d], b_dec [L, d] as leaf copies."""
    shapes = sae.tensor_shapes()
    return [
        getattr(sae, n).detach().reshape(shapes[n]).clone().requires_grad_()
        for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    ]


def _dense(params, x, k_total, dead, k_aux, aux_coef):
    """Plain-torch crosscoder: per-layer encoders summed, TopK over F, per-layer decoders."""
    W_enc, b_enc, W_dec, b_dec = params  # noqa: N806
    u = _normalize(x).view(-1, L, D)  # [T, L, d]
    pre = torch.einsum("tld,ldf->tf", u - b_dec, W_enc) + b_enc  # [T, F]
    v, i = pre.topk(k_total, dim=1)
    z = torch.zeros_like(pre).scatter(1, i, v).relu()
    u_hat = torch.einsum("tf,fld->tld", z, W_dec) + b_dec  # [T, L, d]
    err = (u - u_hat).pow(2).sum()
    total = (u - u.mean(0)).pow(2).sum()  # each layer's variance about its own batch mean
    rec = err / total
    mask = torch.full((pre.shape[1],), float("-inf"))
    mask[dead] = 0
    av, ai = (pre + mask).topk(min(k_aux, len(dead)), dim=1)
    e = (u - u_hat).detach().reshape(len(u), -1)
    e_hat = torch.einsum("tf,fld->tld", torch.zeros_like(pre).scatter(1, ai, av.relu()), W_dec)
    auxk = _fvu(e, e_hat.reshape(len(u), -1))
    return rec + aux_coef * auxk, rec, auxk, z, u_hat


@pytest.mark.parametrize("k_aux", [2, 9])  # fewer / more than the 5 dead latents
def test_loss_code_and_gradients_equal_dense_reference(k_aux):
    torch.manual_seed(1)
    sae = _xc()
    x = torch.randn(10 * L, D) * 2 + 1
    dead = torch.tensor([0, 7, 9, 20, 33])
    out = sae.train_step_forward(x, dead, k_aux=k_aux, aux_coef=0.25)
    out.loss.backward()
    params = _weights(sae)
    loss, rec, auxk, z, _ = _dense(params, x, K * L, dead, k_aux, 0.25)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **TOL)
    torch.testing.assert_close(out.fvu, rec.detach(), **TOL)
    torch.testing.assert_close(out.auxk, auxk.detach(), **TOL)
    assert float(out.auxk.detach()) > 0
    code = torch.zeros_like(z).scatter_add(1, out.top_indices, out.top_acts)
    torch.testing.assert_close(code, z.detach(), **TOL)
    shapes = sae.tensor_shapes()
    for name, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), params, strict=True):
        grad = getattr(sae, name).grad.reshape(shapes[name])
        torch.testing.assert_close(grad, ref.grad, rtol=1e-4, atol=1e-6)


def test_per_layer_code_is_the_shared_code_times_decoder_norms_and_decodes_exactly(tmp_path):
    torch.manual_seed(3)
    sae = _xc()
    x = torch.randn(7 * L, D) * 2 + 1
    with torch.no_grad():
        enc = sae.encode(x)
        params = _weights(sae)
        _, _, _, z, u_hat = _dense(params, x, K * L, torch.tensor([], dtype=torch.long), 0, 0)
        norms = params[2].norm(dim=2)  # [F, L]
        want = (z.unsqueeze(1) * norms.t().unsqueeze(0)).reshape(-1, sae.cfg.d_sae)  # [T L, F]
        assert enc.top_acts.shape == (len(x), sae.code_width) == (len(x), K * L)
        assert (enc.top_acts >= 0).all()
        assert all(len(set(row.tolist())) == K * L for row in enc.top_indices)
        torch.testing.assert_close(sae.dense_acts(enc), want, **TOL)
        raw = u_hat.reshape(-1, D) * (x.std(1, keepdim=True) + 1e-5) + x.mean(1, keepdim=True)
        torch.testing.assert_close(sae.decode(enc), raw, **TOL)
        share = sae.layer_share()
        torch.testing.assert_close(share, norms / norms.sum(1, keepdim=True), **TOL)
        with pytest.raises(MlsaeError, match="whole tokens"):
            sae.encode(x[:4])
    sae.save(tmp_path / "s")
    w = load_file(str(tmp_path / "s" / "sae.safetensors"))
    assert {n: tuple(t.shape) for n, t in w.items()} == {
        "W_enc": (L, D, R * D), "b_enc": (R * D,), "W_dec": (R * D, L, D), "b_dec": (L, D)
    }  # fmt: skip
    torch.testing.assert_close(w["W_dec"], params[2].detach(), rtol=0, atol=0)
    back = load_sae(tmp_path / "s")
    assert type(back) is CrosscoderSAE and back.cfg == sae.cfg
    with torch.no_grad():
        assert torch.equal(back.dense_acts(back.encode(x)), sae.dense_acts(enc))


def test_training_needs_whole_tokens():
    with pytest.raises(MlsaeError, match="whole tokens"):
        _xc().train_step_forward(torch.randn(L + 1, D))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return _cache(tmp_path_factory.mktemp("cache") / "c")


def test_run_trains_saves_and_resumes_bit_identically(cache, tmp_path):
    whole = _train(tmp_path / "whole", cache, "crosscoder")
    _train(tmp_path / "part", cache, "crosscoder", max_steps=3)
    train_command(tmp_path / "part", resume=True, train_given={"max_steps": 6})
    a = load_file(str(whole / "sae" / "sae.safetensors"))
    b = load_file(str(tmp_path / "part" / "sae" / "sae.safetensors"))
    assert a.keys() == b.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sae = load_sae(whole)
    assert sae.cfg.architecture == "crosscoder" and sae.cfg.layers == [0, 2, 5]
    with pytest.raises(MlsaeError, match="multiple of the 3 layers"):
        _train(tmp_path / "r", cache, "crosscoder", batch_tokens=50)
