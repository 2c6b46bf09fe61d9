"""The SAE architectures (mlsae.sae.registry): the contract every one keeps (one parametrised
test), each training loss against a dense plain-torch reference (values and gradients), save /
load and resume, token-grouped batches, and old cfg.json files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file

from mlsae.activations.cache import ActivationCache, CacheWriter
from mlsae.core.config import (
    Architecture,
    DataConfig,
    ModelConfig,
    SaeConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae
from mlsae.sae.registry import ARCHITECTURES, sae_class
from mlsae.train.loop import train_command

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = [a for a in ARCHITECTURES if a != "crosscoder"]  # its code is per token: test_crosscoder
N_LAYERS = 3
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _sae(arch: str, d=12, r=6, k=3, layers=(0, 1, 2), prefixes=3, seed=0) -> SparseAutoencoder:
    cfg = SaeConfig(
        d_in=d,
        expansion_factor=r,
        k=k,
        layers=list(layers),
        architecture=arch,
        matryoshka_prefixes=prefixes,
    )
    sae = SparseAutoencoder(cfg, seed=seed, compute_dtype=torch.float32)
    with torch.no_grad():  # non-trivial biases; some selected pre-activations < 0
        sae.b_enc.normal_(0, 0.3).sub_(0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)


def _fvu(u: torch.Tensor, u_hat: torch.Tensor) -> torch.Tensor:
    return (u - u_hat).pow(2).sum() / (u - u.mean(0)).pow(2).sum()


def _dense_code(arch: str, pre: torch.Tensor, k: int, n_layers: int) -> torch.Tensor:
    """The training code of each architecture, by brute force on the dense pre-activations."""
    n, m = pre.shape
    if arch in ("topk", "matryoshka"):
        v, i = pre.topk(k, dim=1)
        return torch.zeros_like(pre).scatter(1, i, v).relu()
    if arch == "batchtopk":
        v, i = pre.reshape(-1).topk(k * n)
        return torch.zeros(n * m).scatter(0, i, v).relu().view(n, m)
    assert arch == "token_topk"
    grouped = pre.reshape(n // n_layers, n_layers * m)
    v, i = grouped.topk(k * n_layers, dim=1)
    return torch.zeros_like(grouped).scatter(1, i, v).relu().view(n, m)


def _dense_loss(arch, sae, params, x, dead, k_aux, aux_coef):
    """Plain-torch training loss of `arch` (SPEC 2 + the architecture's terms) -> (loss, fvu,
    auxk, code)."""
    W_enc, b_enc, W_dec, b_dec = params  # noqa: N806
    u = _normalize(x)
    pre = (u - b_dec) @ W_enc + b_enc
    z = _dense_code(arch, pre, sae.cfg.k, len(sae.cfg.layers))
    u_hat = z @ W_dec + b_dec
    rec = _fvu(u, u_hat)
    mask = torch.full((pre.shape[1],), float("-inf"))
    mask[dead] = 0
    av, ai = (pre + mask).topk(min(k_aux, len(dead)), dim=1)
    e = (u - u_hat).detach()
    e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ W_dec
    auxk = _fvu(e, e_hat)
    loss = rec + aux_coef * auxk
    if arch == "matryoshka":
        m, n = sae.cfg.d_sae, sae.cfg.matryoshka_prefixes
        for p in range(n - 1):
            size = m // 2 ** (n - 1 - p)
            loss = loss + _fvu(u, z[:, :size] @ W_dec[:size] + b_dec)
    return loss, rec, auxk, z


# ----------------------------------------------------------------------------- the registry


def test_registry_names_are_the_cli_choices():
    assert tuple(ARCHITECTURES) == get_args(Architecture)
    for name in ARCHS:
        cls = sae_class(name)
        assert issubclass(cls, SparseAutoencoder)
        assert type(_sae(name)) is cls  # SparseAutoencoder(cfg) builds cfg.architecture's class
    with pytest.raises(MlsaeError, match="--architecture must be one of"):
        SaeGridConfig(architecture="nope")  # type: ignore[arg-type]
    with pytest.raises(MlsaeError, match="unknown SAE architecture"):
        sae_class("nope")


def test_old_cfg_json_without_architecture_loads_as_topk(tmp_path):
    sae = _sae("topk")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["architecture"], cfg["matryoshka_prefixes"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "s")
    assert loaded.cfg.architecture == "topk" and type(loaded) is sae_class("topk")


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("arch", ARCHS)
def test_contract(arch, tmp_path):
    """encode -> [N, w] code with activation 0 = inactive, from each row alone; decode = the
    code times W_dec plus b_dec, mapped back; training loss finite with gradients; save / load
    returns the same tensors and the same code; a wrong tensor shape is refused."""
    torch.manual_seed(3)
    sae = _sae(arch)
    x = torch.randn(4 * N_LAYERS, 12) * 2 + 1
    out = sae.train_step_forward(x, torch.tensor([1, 5]), k_aux=2, aux_coef=0.5)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sae.parameters())
    with torch.no_grad():
        enc = sae.encode(x)
        n, w = enc.top_acts.shape
        assert n == len(x) and enc.top_indices.shape == (n, w) and w == sae.code_width
        assert sae.encode(x[:1]).top_acts.shape == (1, w)  # one width in every call
        assert all(len(set(row.tolist())) == w for row in enc.top_indices)  # distinct per row
        assert enc.top_acts.dtype == torch.float32 and enc.top_indices.dtype == torch.int64
        assert (enc.top_acts >= 0).all()
        assert ((enc.top_indices >= 0) & (enc.top_indices < sae.cfg.d_sae)).all()
        dense = sae.dense_acts(enc)
        for i in (0, 5):  # each row's code depends on that row alone
            torch.testing.assert_close(sae.dense_acts(sae.encode(x[i : i + 1]))[0], dense[i], **TOL)
        u = _normalize(x)
        raw = lambda uh: uh * (x.std(1, keepdim=True) + 1e-5) + x.mean(1, keepdim=True)  # noqa: E731
        torch.testing.assert_close(sae.decode(enc), raw(dense @ sae.W_dec + sae.b_dec), **TOL)
        assert float(_fvu(u, dense @ sae.W_dec + sae.b_dec)) < 2
    sae.save(tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    names = list(sae.tensor_shapes())
    assert names[:4] == ["W_enc", "b_enc", "W_dec", "b_dec"]
    for name, t in sae.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t), name
    with torch.no_grad():
        assert torch.equal(back.dense_acts(back.encode(x)), dense)
    bad = {**load_file(str(tmp_path / "s" / "sae.safetensors"))}
    bad["b_dec"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(MlsaeError, match="does not match"):
        load_sae(tmp_path / "s")


# ----------------------------------------------------------------------------- dense references


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k_aux", [2, 9])  # fewer / more than the 5 dead latents
def test_training_loss_and_gradients_equal_dense_reference(arch, k_aux):
    torch.manual_seed(1)
    sae = _sae(arch)
    x = torch.randn(10 * N_LAYERS, 12) * 2 + 1
    dead = torch.tensor([0, 7, 9, 20, 33])
    out = sae.train_step_forward(x, dead, k_aux=k_aux, aux_coef=0.25)
    out.loss.backward()
    params = [
        p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    ]
    loss, rec, auxk, z = _dense_loss(arch, sae, params, x, dead, k_aux, 0.25)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **TOL)
    torch.testing.assert_close(out.fvu, rec.detach(), **TOL)
    torch.testing.assert_close(out.auxk, auxk.detach(), **TOL)
    code = torch.zeros_like(z).scatter_add(1, out.top_indices, out.top_acts)
    torch.testing.assert_close(code, z.detach(), **TOL)
    for p, ref in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), params, strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6)


def _capped_count(pre: torch.Tensor, t: float, width: int) -> int:
    """Plain torch: latents an inference code keeps over the rows of pre, each row its
    pre-activations above t (and 0), at most `width` of them."""
    return int((pre > max(t, 0.0)).sum(1).clamp_max(width).sum())


@pytest.mark.parametrize("arch", ["batchtopk", "token_topk"])
def test_calibrated_threshold_keeps_k_per_vector_on_the_sample_and_is_used_at_inference(arch):
    torch.manual_seed(2)
    sae = _sae(arch, k=2)
    assert float(sae.threshold) == -1  # not calibrated yet
    for _ in range(3):  # training does not touch the threshold
        sae.train_step_forward(torch.randn(8 * N_LAYERS, 12) * 2 + 1)
    assert float(sae.threshold) == -1
    x = torch.randn(40 * N_LAYERS, 12) * 2 + 1
    with torch.no_grad():  # 20 latents reading one direction; rows along it: the cap binds
        sae.W_enc[:, :20] = sae.W_enc[:, :1]
        x[::10] = sae.W_enc[:, 0] * 10 + 0.1 * x[::10]
    cal = sae.calibration()
    cal.add(x[:50])
    cal.add(x[50:])
    t = cal.finish()
    assert float(sae.threshold) == pytest.approx(t)
    with torch.no_grad():
        pre = (_normalize(x) - sae.b_dec) @ sae.W_enc + sae.b_enc
    n, w, want = len(x), sae.code_width, sae.cfg.k * len(x)
    # brute force: the kept count is non-increasing in t; t sits in the gap where it is k N
    values = torch.unique(pre[pre > 0])  # ascending
    counts = [_capped_count(pre, float(v), w) for v in values]
    above = [float(v) for v, c in zip(values, counts, strict=True) if c < want]
    below = [float(v) for v, c in zip(values, counts, strict=True) if c >= want]
    assert max(below) < t < min(above)
    assert _capped_count(pre, t, w) == want
    assert (pre > t).sum(1).max() > w  # the cap binds on some rows (the capped count matters)
    # inference uses it: the code is the capped above-threshold set, k N latents in all
    kept = pre * (pre > t)
    v, i = kept.topk(w, dim=1)
    want_code = torch.zeros_like(pre).scatter(1, i, v)
    code = sae.dense_acts(sae.encode(x))
    torch.testing.assert_close(code, want_code, **TOL)
    assert int((code > 0).sum()) == want == 2 * n


def test_token_topk_spreads_a_tokens_latents_over_its_layers_and_needs_whole_tokens():
    """Each token keeps k x L latents in all, but a layer vector may get more or fewer than k."""
    torch.manual_seed(4)
    sae = _sae("token_topk", k=2)
    out = sae.train_step_forward(torch.randn(20 * N_LAYERS, 12))
    per_vector = (out.top_acts > 0).sum(1)
    assert (per_vector.view(-1, N_LAYERS).sum(1) <= 2 * N_LAYERS).all()
    assert (per_vector != 2).any()
    with pytest.raises(MlsaeError, match="whole tokens"):
        sae.train_step_forward(torch.randn(N_LAYERS + 1, 12))


# ----------------------------------------------------------------------------- training runs


def _cache(path: Path, n_tokens=1024, d=12) -> Path:
    g = torch.Generator().manual_seed(0)
    meta = {
        "layers": [0, 2, 5],
        "d_model": d,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "train",
        "context_length": 64,
    }
    w = CacheWriter(path, meta, shard_tokens=256, storage_dtype="float32")
    for _ in range(0, n_tokens, 128):
        mask = torch.ones(128, dtype=torch.bool)
        mask[::32] = False
        w.add(torch.randn(128, N_LAYERS, d, generator=g), torch.randint(0, 50, (128,)), mask)
    w.close()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("cache") / "c")


def test_token_grouped_batches_hold_whole_tokens_and_the_same_vectors(cache):
    src = ActivationCache(cache)
    plain = list(src.shuffled(6 * N_LAYERS, seed=1, buffer_shards=2))
    grouped = list(src.shuffled(6 * N_LAYERS, seed=1, buffer_shards=2, group_tokens=True))
    for b in grouped:
        pos = b.position.view(-1, N_LAYERS)
        assert (pos == pos[:, :1]).all()  # each token's L vectors consecutive
        assert b.layer.view(-1, N_LAYERS).tolist() == [[0, 2, 5]] * len(pos)
    key = lambda bs: sorted(  # noqa: E731
        zip(
            torch.cat([b.position for b in bs]).tolist(),
            torch.cat([b.layer for b in bs]).tolist(),
            strict=True,
        )
    )
    assert key(plain) == key(grouped)


def _train(out: Path, cache: Path, arch: str, **train_kw) -> Path:
    train = TrainConfig(
        **{
            **dict(batch_tokens=48, lr=2e-3, dead_tokens=100, checkpoint_every=3, max_steps=6),
            **train_kw,
        }
    )
    return train_command(
        out,
        inputs=Inputs(source=SourceConfig(cache=cache), data=DataConfig(), model=ModelConfig()),
        sae=SaeGridConfig(
            expansion_factor=[4],
            k=[3],
            architecture=arch,  # type: ignore[arg-type]
            matryoshka_prefixes=3,
        ),
        train=train,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_run_trains_saves_and_resumes_bit_identically(arch, cache, tmp_path):
    whole = _train(tmp_path / "whole", cache, arch)
    _train(tmp_path / "part", cache, arch, max_steps=3)
    train_command(tmp_path / "part", resume=True, train_given={"max_steps": 6})
    a = load_file(str(whole / "sae" / "sae.safetensors"))
    b = load_file(str(tmp_path / "part" / "sae" / "sae.safetensors"))
    assert a.keys() == b.keys() == set(sae_class(arch)(load_sae(whole).cfg).tensor_shapes())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sae = load_sae(whole)
    assert sae.cfg.architecture == arch and sae.cfg.layers == [0, 2, 5]
    if arch in ("batchtopk", "token_topk"):
        # calibrated on the run's training vectors (all of this small cache): k per vector on
        # average over them, counted here in plain torch
        xs = _all_vectors(cache)
        with torch.no_grad():
            u = _normalize(xs)
            pre = (u - sae.b_dec) @ sae.W_enc + sae.b_enc
        assert float(sae.threshold) > 0
        assert _capped_count(pre, float(sae.threshold), sae.code_width) == sae.cfg.k * len(xs)


def _all_vectors(path: Path) -> torch.Tensor:
    """Every vector of a cache (all its tokens and layers), in plain reads."""
    src = ActivationCache(path)
    return torch.cat([b.x for b in src.shuffled(999, seed=0, buffer_shards=1)])


def test_token_topk_refuses_batches_of_partial_tokens(cache, tmp_path):
    with pytest.raises(MlsaeError, match="multiple of the 3 layers"):
        _train(tmp_path / "r", cache, "token_topk", batch_tokens=50)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_export_takes_topk_codes_and_refuses_threshold_codes_in_one_line(arch):
    from mlsae.interchange.saelens import saelens_config

    sae = _sae(arch)
    if arch in ("topk", "matryoshka"):  # Matryoshka's inference code is TopK's
        cfg = saelens_config(sae, "blocks.0.hook_resid_post", 0, {}, approximate=True)
        assert cfg["architecture"] == "topk" and cfg["k"] == sae.cfg.k
        return
    with pytest.raises(MlsaeError, match="cannot be exported to SAELens") as e:
        saelens_config(sae, "blocks.0.hook_resid_post", 0, {}, approximate=True)
    assert "\n" not in str(e.value)


def test_a_per_layer_set_calibrates_each_threshold_on_its_own_block(cache, tmp_path):
    out = train_command(
        tmp_path / "pl",
        inputs=Inputs(SourceConfig(cache=cache), DataConfig(), ModelConfig()),
        sae=SaeGridConfig(expansion_factor=[4], k=[3], architecture="batchtopk", per_layer=True),
        train=TrainConfig(batch_tokens=48, lr=2e-3, dead_tokens=100, max_steps=4),
    )
    src = ActivationCache(cache)
    batches = list(src.shuffled(999, seed=0, buffer_shards=1))
    xs, layers = torch.cat([b.x for b in batches]), torch.cat([b.layer for b in batches])
    for layer in (0, 2, 5):
        sae = load_sae(out / f"layer_{layer:02d}")
        x = xs[layers == layer]
        with torch.no_grad():
            pre = (_normalize(x) - sae.b_dec) @ sae.W_enc + sae.b_enc
        count = _capped_count(pre, float(sae.threshold), sae.code_width)
        assert count == sae.cfg.k * len(x), layer
