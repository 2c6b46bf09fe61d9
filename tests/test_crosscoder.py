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


@pytest.fixture(params=["sparse", "dense"])
def decoder_path(request, monkeypatch):
    """The decoder and the encoder's backward forced onto one of their two paths, the sparse
    kernels or dense matmuls (kernels.dense_pays)."""
    from mlsae.sae import kernels

    dense = request.param == "dense"
    monkeypatch.setattr(kernels, "DENSE_DECODE_DENSITY", 0.0 if dense else 2.0)
    monkeypatch.setattr(kernels, "DENSE_DECODE_WIDTH", 0 if dense else 1 << 30)
    return request.param


# fewer / more than the 5 dead latents (AuxK dense over their columns); 18 dead: sparse AuxK
@pytest.mark.parametrize("k_aux, n_dead", [(2, 5), (9, 5), (2, 18)])
def test_loss_code_and_gradients_equal_dense_reference(k_aux, n_dead, decoder_path):
    torch.manual_seed(1)
    sae = _xc()
    x = torch.randn(10 * L, D) * 2 + 1
    dead = torch.tensor([0, 7, 9, 20, 33]) if n_dead == 5 else torch.arange(0, 72, 4)
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


@pytest.mark.parametrize("aux", [False, True])
def test_dense_decode_equals_the_sparse_path_values_and_gradients(aux):
    """kernels.dense_decode (a scatter then a matmul) against the embedding-bag path: the same
    reconstruction and the same gradients of the code and of W_dec, AuxK's dead columns too."""
    from mlsae.sae import kernels

    g = torch.Generator().manual_seed(5)
    n, m, d, w = 7, 40, 9, 12
    idx = torch.rand(n, m, generator=g).topk(w, dim=1).indices  # distinct within a row
    acts = torch.rand(n, w, generator=g)
    dead = torch.tensor([3, 11, 29]) if aux else None
    a_aux = torch.rand(n, 3, generator=g) if aux else None
    grad_out = torch.randn(n, d, generator=g)
    grad_aux = torch.randn(n, d, generator=g)
    got = {}
    for path, (density, width) in {"sparse": (2.0, 1 << 30), "dense": (0.0, 0)}.items():
        a = acts.clone().requires_grad_()
        wd = torch.randn(m, d, generator=torch.Generator().manual_seed(6)).requires_grad_()
        b = None if a_aux is None else a_aux.clone().requires_grad_()
        old = kernels.DENSE_DECODE_DENSITY, kernels.DENSE_DECODE_WIDTH
        kernels.DENSE_DECODE_DENSITY, kernels.DENSE_DECODE_WIDTH = density, width
        try:
            out, e_hat = kernels.sparse_decode_aux(a, idx, wd, b, dead)
        finally:
            kernels.DENSE_DECODE_DENSITY, kernels.DENSE_DECODE_WIDTH = old
        loss = (out * grad_out).sum() + (e_hat * grad_aux).sum() if aux else (out * grad_out).sum()
        loss.backward()
        got[path] = (out, e_hat, a.grad, wd.grad, None if b is None else b.grad)
        # plain torch: the code scattered densely, a matmul
        with torch.no_grad():
            z = torch.zeros(n, m).scatter(1, idx, acts)
            torch.testing.assert_close(out.detach(), z @ wd, **TOL)
    for s_t, d_t in zip(got["sparse"], got["dense"], strict=True):
        if s_t is not None:
            torch.testing.assert_close(d_t, s_t, **TOL)
    assert got["dense"][3].abs().sum() > 0


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
        "W_enc": (L, D, R * D),
        "b_enc": (R * D,),
        "W_dec": (R * D, L, D),
        "b_dec": (L, D),
    }
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
    assert not whole.joinpath("sae", "cfg.json").read_text().count('"center_layers": true')


def test_per_layer_centring_is_off_for_the_crosscoder() -> None:
    from mlsae.core.config import SaeGridConfig

    assert SaeGridConfig(architecture="crosscoder").center_layers == "auto"  # resolved to off
    with pytest.raises(MlsaeError, match="decoder bias per block"):
        SaeGridConfig(architecture="crosscoder", center_layers="on")


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    from conftest import model_with_test_cache

    root = tmp_path_factory.mktemp("xc_eval")
    model, mdir, data = model_with_test_cache(root, "llama", tokenizer, 32)
    cfg = SaeConfig(
        d_in=32,
        expansion_factor=2,
        k=4,
        layers=[0, 1, 2],
        model=mdir,
        dataset=data,
        architecture="crosscoder",
    )
    sae = SparseAutoencoder(cfg, seed=0, compute_dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    sae.save(root / "xc" / "sae")
    return root, model


@torch.no_grad()
def _clean_blocks(model, ids, blocks):
    """Block outputs [B, T, d] of a plain forward, by hooks."""
    from mlsae.data.capture import get_blocks

    got = {}

    def hook_for(b):
        def hook(_m, _i, o):
            got[b] = (o[0] if isinstance(o, tuple) else o).detach().float().clone()

        return hook

    handles = [get_blocks(model)[b].register_forward_hook(hook_for(b)) for b in blocks]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


def test_evaluate_fvu_per_layer_and_replace_all_against_dense_reference(tiny, tmp_path):
    """Per-layer FVU from one code per token, and --replace all splicing the reconstructions of
    the clean pass (an acausal code reads every block) against hand hooks."""
    import json

    from test_replace import _cache_batch, hooked_replace
    from typer.testing import CliRunner

    from mlsae.cli.app import app

    root, model = tiny
    out = tmp_path / "eval.json"
    args = [
        "evaluate",
        str(root / "xc"),
        "--out",
        str(out),
        "--cache",
        str(root / "cache_test"),
        "--replace",
        "all",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    sae = load_sae(root / "xc")
    assert isinstance(sae, CrosscoderSAE)
    ids, used = _cache_batch(root)
    clean = _clean_blocks(model, ids, [0, 1, 2])
    xs = torch.stack([clean[b][used] for b in range(3)], 1)  # [N, L, d]
    params = _weights(sae)
    with torch.no_grad():
        u = _normalize(xs.reshape(-1, 32)).view(-1, 3, 32)
        pre = torch.einsum("tld,ldf->tf", u - params[3], params[0]) + params[1]
        v, i = pre.topk(4 * 3, dim=1)
        z = torch.zeros_like(pre).scatter(1, i, v).relu()
        u_hat = torch.einsum("tf,fld->tld", z, params[2]) + params[3]
        x = xs.reshape(-1, 32)
        x_hat = (
            u_hat.reshape(-1, 32) * (x.std(1, keepdim=True) + 1e-5) + x.mean(1, keepdim=True)
        ).view(-1, 3, 32)
    for b in range(3):
        err = (xs[:, b] - x_hat[:, b]).pow(2).sum()
        var = (xs[:, b] - xs[:, b].mean(0)).pow(2).sum()
        assert result["per_layer"]["fvu"][b] == pytest.approx(float(err / var), rel=1e-3, abs=1e-5)
    rows = result["sections"]["replace"]["rows"]
    assert [r["blocks"] for r in rows] == [[0], [0, 1], [0, 1, 2]]
    for row in rows:
        ce, kl, n = hooked_replace(model, ids, used, row["blocks"], lambda b, _x: x_hat[:, b])
        assert row["n_pred"] == n
        assert row["delta_ce"] == pytest.approx(ce / n, abs=1e-4, rel=1e-3)
        assert row["kl"] == pytest.approx(kl / n, abs=1e-4, rel=1e-3)
    assert rows[0]["delta_ce"] == pytest.approx(result["per_layer"]["delta_ce"][0], abs=1e-5)


def _refused(args: list[str], match: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from mlsae.cli.app import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0
    assert isinstance(res.exception, MlsaeError), res.output
    assert match in str(res.exception) and "\n" not in str(res.exception)
    assert not any(tmp_path.iterdir())  # nothing written


def test_evaluate_refuses_a_subset_of_layers_and_saebench_in_one_line(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "o"
    out.mkdir()
    base = [
        "evaluate",
        str(root / "xc"),
        "--out",
        str(out / "e.json"),
        "--cache",
        str(root / "cache_test"),
    ]
    _refused([*base, "--layers", "0,1"], "reads all the layers", out)
    _refused([*base, "--format", "saebench"], "SAEBench", out)


def test_analyze_reports_the_decoder_norm_share(tiny, tmp_path):
    """analyze takes the crosscoder (its rows are whole tokens) and reports where its latents
    live: the decoder-norm share, against a brute-force computation from the saved weights."""
    import json

    from typer.testing import CliRunner

    from mlsae.cli.app import app

    root, _ = tiny
    res = CliRunner().invoke(
        app,
        [
            "analyze",
            str(root / "xc"),
            "--cache",
            str(root / "cache_test"),
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "a" / "analysis.json").read_text())["layer_share"]
    w = load_file(str(root / "xc" / "sae" / "sae.safetensors"))["W_dec"].double()  # [F, L, d]
    norms = w.norm(dim=2)
    share = norms / norms.sum(1, keepdim=True)
    assert got["layers"] == [0, 1, 2]
    assert got["mean_share"] == pytest.approx(share.mean(0).tolist(), rel=1e-5)
    assert sum(got["mean_share"]) == pytest.approx(1.0)
    assert got["peak_latents"] == torch.bincount(share.argmax(1), minlength=3).tolist()
    eff = float((1 / share.pow(2).sum(1)).mean())
    assert got["effective_layers"] == pytest.approx(eff, rel=1e-5) and 1 <= eff <= 3


def test_index_explore_and_saelens_export_refuse_in_one_line_hub_export_and_load_work(
    tiny, tmp_path
):
    root, _ = tiny
    out = tmp_path / "o"
    out.mkdir()
    cache = str(root / "cache_test")
    _refused(
        ["index", str(root / "xc"), "--cache", cache, "--out", str(out / "i.db")],
        "reads all layers of a token",
        out,
    )
    _refused(
        [
            "export",
            str(root / "xc"),
            "--format",
            "saelens",
            "--approximate",
            "--out",
            str(out / "e"),
        ],
        "SAELens has no crosscoder format",
        out,
    )
    from typer.testing import CliRunner

    from mlsae.cli.app import app

    res = CliRunner().invoke(
        app, ["export", str(root / "xc"), "--format", "hub", "--out", str(tmp_path / "hub")]
    )
    assert res.exit_code == 0, res.output
    assert "acausal crosscoder" in (tmp_path / "hub" / "README.md").read_text()
    back = load_sae(tmp_path / "hub")
    want = load_sae(root / "xc")
    assert isinstance(back, CrosscoderSAE)
    for name, t in want.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
