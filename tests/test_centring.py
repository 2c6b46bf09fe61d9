"""Per-layer centring of the MLSAE (mlsae.sae.centring, train/centring.py): the math against a
plain-torch reference, files, old SAEs, training's estimate, evaluation's splice and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae.activations.cache import CacheWriter
from mlsae.core.config import (
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
from mlsae.sae.centring import BlockMeans, auto_choice, rows_of_blocks
from mlsae.sae.folders import load_sae

EPS = 1e-5
LAYERS = [1, 3, 4]


def centred_sae(seed: int = 0, normalize: str = "standardize", layers=LAYERS, d: int = 16):
    cfg = SaeConfig(
        d_in=d,
        expansion_factor=4,
        k=5,
        layers=list(layers),
        center_layers=True,
        normalize=normalize,
    )  # type: ignore[arg-type]
    sae = SparseAutoencoder(cfg, seed=seed, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(cfg.d_sae, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d, generator=g))
        sae.layer_means.copy_(torch.randn(len(layers), d, generator=g))
    return sae


def reference(x: torch.Tensor, block: torch.Tensor, w: dict[str, torch.Tensor], k: int):
    """Centre, encode, decode, uncentre in float64 from the definition (standardize)."""
    x = x.double()
    mean = x.mean(1, keepdim=True)
    std = ((x - mean).pow(2).sum(1, keepdim=True) / (x.shape[1] - 1)).sqrt()
    u = (x - mean) / (std + EPS)
    mu = torch.stack([w["layer_means"][LAYERS.index(int(b))] for b in block]).double()
    pre = (u - mu - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
    u_hat = z @ w["W_dec"].double() + w["b_dec"].double() + mu
    return u_hat * (std + EPS) + mean, z


def test_forward_matches_plain_torch_reference():
    sae = centred_sae()
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(40, 16, generator=g) + 0.5
    block = torch.tensor(LAYERS)[torch.randint(0, 3, (40,), generator=g)]
    x_hat, enc = sae(x, block)
    ref, z = reference(x, block, sae.state_tensors(), sae.cfg.k)
    torch.testing.assert_close(x_hat.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.dense_acts(enc).double(), z, rtol=1e-4, atol=1e-4)
    # one block for all rows == that block given per row
    one, _ = sae(x, 3)
    torch.testing.assert_close(one, sae(x, torch.full((40,), 3))[0], rtol=0, atol=0)
    # the centring matters: zero means give another reconstruction
    with torch.no_grad():
        sae.layer_means.zero_()
    assert not torch.allclose(sae(x, block)[0], x_hat, atol=1e-3)


def test_block_is_required_and_checked():
    sae = centred_sae()
    x = torch.randn(4, 16)
    with pytest.raises(MlsaeError, match="must give the block"):
        sae.encode(x)
    with pytest.raises(MlsaeError, match="block 2 is not one of"):
        sae.encode(x, 2)
    with pytest.raises(MlsaeError, match="block 9 is not one of"):
        sae.encode(x, torch.tensor([1, 3, 9, 4]))
    with pytest.raises(MlsaeError, match="carries the blocks' means"):
        enc = sae.encode(x, 1)
        sae.decode(enc._replace(center=None))
    assert rows_of_blocks(LAYERS, torch.tensor([4, 1, 3]), 3).tolist() == [2, 0, 1]


def test_save_load_round_trip_and_checks(tmp_path):
    sae = centred_sae(seed=2)
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["center_layers"] is True
    back = load_sae(tmp_path / "s", compute_dtype=torch.float32)
    x, block = torch.randn(30, 16), torch.tensor(LAYERS * 10)
    assert torch.equal(back(x, block)[0], sae(x, block)[0])
    w = load_file(str(tmp_path / "s" / "sae.safetensors"))
    bad = dict(w, layer_means=w["layer_means"][:2].clone())  # wrong shape
    save_file(bad, str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(MlsaeError, match="does not match"):
        load_sae(tmp_path / "s")
    nan = w["layer_means"].clone()
    nan[1, 3] = float("nan")
    save_file(dict(w, layer_means=nan), str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(MlsaeError, match="layer_means holds NaN"):
        load_sae(tmp_path / "s")
    missing = {n: t for n, t in w.items() if n != "layer_means"}
    save_file(missing, str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(MlsaeError, match="does not match"):
        load_sae(tmp_path / "s")


def test_old_sae_without_the_field_is_unchanged(tmp_path):
    cfg = SaeConfig(d_in=16, expansion_factor=4, k=5, layers=LAYERS)
    sae = SparseAutoencoder(cfg, seed=5, compute_dtype=torch.float32)
    sae.save(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "cfg.json").read_text())
    del raw["center_layers"]  # as written before the option existed
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(raw))
    old = load_sae(tmp_path / "old", compute_dtype=torch.float32)
    assert old.cfg.center_layers is False
    assert set(load_file(str(tmp_path / "old" / "sae.safetensors"))) == {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
    }
    x = 3 * torch.randn(50, 16) - 1
    a, enc_a = sae(x)
    b, enc_b = old(x)
    c, _ = old(x, torch.tensor(LAYERS * 16 + LAYERS[:2]))  # the block is ignored
    assert torch.equal(a, b) and torch.equal(b, c) and enc_b.center is None
    assert torch.equal(enc_a.top_indices, enc_b.top_indices)
    # the old path is the uncentred reference
    w = dict(sae.state_tensors(), layer_means=torch.zeros(3, 16))
    ref, _ = reference(x, torch.tensor([1] * 50), w, 5)
    torch.testing.assert_close(a.double(), ref, rtol=1e-4, atol=1e-4)


def test_block_means_against_numpy():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(200, 8, generator=g) + torch.arange(8.0)
    block = torch.tensor(LAYERS)[torch.randint(0, 3, (200,), generator=g)]
    acc = BlockMeans(LAYERS, 8)
    acc.update(u[:77], block[:77])
    acc.update(u[77:], block[77:])
    un, bn = u.double().numpy(), block.numpy()
    for i, ly in enumerate(LAYERS):
        rows = un[bn == ly]
        mean = rows.mean(0)
        np.testing.assert_allclose(acc.means()[i].numpy(), mean, rtol=1e-5, atol=1e-6)
        dev = np.sqrt(((rows - mean) ** 2).sum(1).mean())
        assert acc.ratios()[i] == pytest.approx(np.linalg.norm(mean) / dev, rel=1e-6)
    assert auto_choice([0.5, 2.5]) and not auto_choice([1.2, 1.3])
    with pytest.raises(MlsaeError, match="no vectors of blocks"):
        BlockMeans(LAYERS, 8).means()


def _offset_cache(path: Path, n_tokens=1024, d=16, seed=0) -> Path:
    """A cache whose three blocks have large, different mean vectors (Gemma-like)."""
    g = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.randn(3, d, generator=g)
    meta = {
        "layers": LAYERS,
        "d_model": d,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "train",
        "context_length": 64,
    }
    w = CacheWriter(path, meta, shard_tokens=256, storage_dtype="float32")
    for _ in range(0, n_tokens, 128):
        acts = means + torch.randn(128, 3, d, generator=g)
        w.add(acts, torch.randint(0, 100, (128,), generator=g), torch.ones(128, dtype=torch.bool))
    w.close()
    return path


def _train(out: Path, cache: Path, center: str) -> Path:
    from mlsae.train.loop import train_command

    return train_command(
        out,
        inputs=Inputs(source=SourceConfig(cache=cache), data=DataConfig(), model=ModelConfig()),
        sae=SaeGridConfig(expansion_factor=[2], k=[4], center_layers=center),
        train=TrainConfig(batch_tokens=128, lr=2e-3, max_steps=12, checkpoint_every=6),
    )


def test_training_estimates_the_block_means(tmp_path, caplog):
    from mlsae.activations.cache import ActivationCache

    cache = _offset_cache(tmp_path / "c")
    with caplog.at_level("INFO"):
        _train(tmp_path / "on", cache, "auto")
    assert "per-layer centring on (auto" in caplog.text
    sae = load_sae(tmp_path / "on" / "sae", compute_dtype=torch.float32)
    assert sae.cfg.center_layers
    ac = ActivationCache(cache)
    acts = torch.cat([ac.load_shard(i).activations for i in range(ac.n_shards)]).double()
    for i in range(3):  # every vector was read (the sample is bigger than the cache)
        x = acts[:, i]
        u = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + EPS)
        np.testing.assert_allclose(sae.layer_means[i].numpy(), u.mean(0).numpy(), atol=1e-5)
    run_cfg = json.loads((tmp_path / "on" / "train_cfg.json").read_text())
    assert run_cfg["sae"]["center_layers"] == "on"  # resolved, so a resume keeps it
    _train(tmp_path / "off", cache, "off")
    assert not load_sae(tmp_path / "off" / "sae").cfg.center_layers
    assert "layer_means" not in load_file(str(tmp_path / "off" / "sae" / "sae.safetensors"))


def test_saelens_export_folds_the_block_mean_into_b_dec(tmp_path):
    from mlsae.interchange.saelens import export_saelens

    sae = centred_sae(seed=4, normalize="layer_norm", layers=[0, 1, 2], d=32)
    model_dir = tmp_path / "m"
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sae.cfg.model = str(model_dir)
    sae.save(tmp_path / "sae")
    folders = export_saelens(tmp_path / "sae", tmp_path / "out")
    x = torch.randn(20, 32)
    for block, folder in zip([0, 1, 2], sorted(folders), strict=True):
        w = {n: t.double() for n, t in load_file(str(folder / "sae_weights.safetensors")).items()}
        assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"}
        xd = x.double()  # SAELens's topk with layer_norm, from its definition
        mean = xd.mean(1, keepdim=True)
        std = ((xd - mean).pow(2).sum(1, keepdim=True) / 31).sqrt()
        pre = ((xd - mean) / (std + EPS) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        top = pre.topk(5, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
        got = (z @ w["W_dec"] + w["b_dec"]) * std + mean
        torch.testing.assert_close(got, sae(x, block)[0].double(), rtol=1e-4, atol=1e-4)
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]["mlsae"]
        assert meta["center_layers"] is False and meta["layers"] == [block]


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_extras_match_independent_computation(tmp_path, tokenizer):
    """fvu_std (numpy standardisation) and delta_ce_typical (a hooked forward leaving the
    positions above the norm threshold clean) of a centred MLSAE, through the splice path."""
    from conftest import hooked_delta_ce, model_with_test_cache

    from mlsae.activations.cache import ActivationCache
    from mlsae.eval.evaluate import Entry, evaluate_entries

    ctx = 32
    model, mdir, _ = model_with_test_cache(tmp_path, "llama", tokenizer, ctx)
    cfg = SaeConfig(d_in=32, expansion_factor=2, k=4, layers=[0, 1, 2], center_layers=True)
    sae = SparseAutoencoder(cfg, seed=1, compute_dtype=torch.float32)
    ac = ActivationCache(tmp_path / "cache_test")
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    acts = torch.cat([s.activations for s in shards])  # [n, L, d]
    mask = torch.cat([s.mask for s in shards])
    ids = torch.cat([s.token_ids for s in shards]).view(-1, ctx)
    with torch.no_grad():  # the means of this very data, so centring matters
        for i in range(3):
            sae.layer_means[i] = sae.standardize(acts[mask][:, i].float())[0].mean(0)
    norms = acts[mask].float().norm(dim=-1)  # [n_used, L]
    thr = {ly: float(norms[:, i].median()) for i, ly in enumerate([0, 1, 2])}  # half are "outliers"
    e = Entry("m", tmp_path, sae, [0, 1, 2], thresholds=thr, bootstrap=True)
    evaluate_entries([e], ac, model=ModelConfig(model=mdir), batch_size=2)
    res = e.result(mdir)
    assert res.per_layer.fvu_std is not None and res.per_layer.delta_ce_typical is not None
    for i, ly in enumerate([0, 1, 2]):
        x = acts[mask][:, i].double()
        with torch.no_grad():
            x_hat = sae(x.float(), ly)[0].double()
        mean = x.mean(1, keepdim=True)
        scale = x.std(1, keepdim=True) + EPS
        u, u_hat = ((x - mean) / scale).numpy(), ((x_hat - mean) / scale).numpy()
        want = ((u - u_hat) ** 2).sum() / ((u - u.mean(0)) ** 2).sum()
        assert res.per_layer.fvu_std[i] == pytest.approx(want, rel=1e-4, abs=1e-6)

        def keep_outliers(h, ly=ly):
            out = sae(h, ly)[0]
            return torch.where((h.norm(dim=-1) > thr[ly])[:, None], h, out)

        used = mask.view(-1, ctx)
        ref = hooked_delta_ce(model, ids, used, ly, keep_outliers)
        assert res.per_layer.delta_ce_typical[i] == pytest.approx(ref, abs=1e-5)
        plain = hooked_delta_ce(model, ids, used, ly, lambda h, ly=ly: sae(h, ly)[0])
        assert res.per_layer.delta_ce[i] == pytest.approx(plain, abs=1e-5)
        assert abs(plain - ref) > 1e-6  # the two columns measure different things
    assert res.intervals is not None
    for key in ("fvu_std", "delta_ce_typical"):
        iv = res.intervals.get(key)
        assert iv is not None and all(v is not None and v.low <= v.high for v in iv.per_layer)
    table = res.table()
    assert "fvu_std" in table and "dce_typ" in table and "standardised space" in table
    assert type(res).from_json(res.to_json()).to_json() == res.to_json()
