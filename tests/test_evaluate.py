"""`mlsae evaluate` end to end on a tiny model: real model.py, cache.py and sae.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mlsae.activations.cache import ActivationCache
from mlsae.activations.extract import build_cache
from mlsae.cli.app import app
from mlsae.core.bootstrap import resample_indices
from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import BootstrapConfig, EvalConfig
from mlsae.eval.cross import cross_command, format_cross
from mlsae.eval.evaluate import evaluate_command
from mlsae.eval.result import EvalResult
from mlsae.report.figures import cross_figures
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import load_sae

CTX = 32


def _opts(
    cache=None,
    layers=None,
    model=None,
    dataset=None,
    split="test",
    tokens=None,
    ce=True,
    batch_size=8,
    allow_train=False,
) -> dict:
    """The config keywords of evaluate_command / cross_command."""
    lay = None if layers is None else ",".join(map(str, layers))
    return dict(
        inputs=Inputs(
            SourceConfig(cache=cache, layers=lay, tokens=tokens, batch_size=batch_size),
            DataConfig(dataset=dataset, split=split, context_length=CTX),
            ModelConfig(model=model),
        ),
        ev=EvalConfig(ce=ce, allow_train=allow_train),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from conftest import make_model, write_word_corpus

    root = tmp_path_factory.mktemp("eval")
    model = make_model("gpt_neox", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_word_corpus(root / "docs.jsonl")
    mdir, data = str(root / "model"), str(root / "docs.jsonl")
    for split in ("test", "train"):
        build_cache(
            root / f"cache_{split}",
            Inputs(
                SourceConfig(tokens=6 * CTX, batch_size=4),
                DataConfig(dataset=data, split=split, context_length=CTX),
                ModelConfig(model=mdir),
            ),
            ExtractConfig(storage_dtype="float32", shard_tokens=2 * CTX),
        )
    for name, layers, seed in (("mlsae", [0, 1, 2], 0), ("l0", [0], 1), ("l2", [2], 2)):
        cfg = SaeConfig(d_in=32, expansion_factor=2, k=4, layers=layers, model=mdir, dataset=data)
        SparseAutoencoder(cfg, seed=seed, compute_dtype=torch.float32).save(root / name / "sae")
    return root, model, mdir, data


def _reference(root: Path, model, sae_dir: Path, layers: list[int]) -> dict:
    """Independent computation on the test cache: numpy FVU and a hooked full forward."""
    sae = load_sae(sae_dir, compute_dtype=torch.float32)
    ac = ActivationCache(root / "cache_test")
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    acts = torch.cat([s.activations for s in shards])  # [n, L, d]
    ids = torch.cat([s.token_ids for s in shards]).view(-1, CTX)
    mask = torch.cat([s.mask for s in shards])
    out: dict = {"fvu": [], "delta_ce": [], "n_tokens": int(mask.sum())}
    active = set()
    for layer in layers:
        x = acts[mask][:, ac.layers.index(layer)].double().numpy()
        with torch.no_grad():
            x_hat, enc = sae(torch.as_tensor(x, dtype=torch.float32))
        active |= set(enc.top_indices[enc.top_acts > 0].tolist())
        err = ((x - x_hat.double().numpy()) ** 2).sum()
        out["fvu"].append(err / ((x - x.mean(0)) ** 2).sum())
        out["delta_ce"].append(_manual_delta_ce(model, sae, ids, mask.view(-1, CTX), layer))
    out["dead_fraction"] = 1 - len(active) / sae.cfg.d_sae
    return out


def _manual_delta_ce(model, sae, ids, used, layer) -> float:
    from conftest import hooked_delta_ce

    return hooked_delta_ce(model, ids, used, layer, lambda h: sae(h)[0])


def test_cli_with_cache_matches_reference(setup, tmp_path):
    root, model, _, _ = setup
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(root / "mlsae"),
            "--cache",
            str(root / "cache_test"),
            "--out",
            str(out),
            "--batch-size",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "mean" in res.stdout and "dead fraction" in res.stdout
    got = json.loads(out.read_text())
    assert set(got) == {
        "layers",
        "per_layer",
        "mean",
        "dead_fraction",
        "n_tokens",
        "sae",
        "model",
        "space",
        "exclude_sink",
        "norm_outliers",
        "intervals",
    }
    iv = got["intervals"]  # the context bootstrap (default 1,000 resamples)
    assert iv["bootstrap"]["n_contexts"] == 6 and iv["bootstrap"]["n_resamples"] == 1000
    for key in ("fvu", "delta_ce", "kl"):
        assert len(iv[key]["per_layer"]) == 3
        for low_high in iv[key]["per_layer"]:
            assert low_high["low"] <= low_high["high"]
            assert key == "delta_ce" or low_high["low"] > 0
    assert "95% CI" in res.stdout and "6 contexts" in res.stdout
    assert EvalResult.from_json(got).to_json() == got  # the typed result round-trips
    assert got["space"] == "model"
    assert set(got["per_layer"]) == {"fvu", "mse", "l0", "delta_ce", "kl", "fvu_std"}
    ref = _reference(root, model, root / "mlsae" / "sae", [0, 1, 2])
    assert got["layers"] == [0, 1, 2]
    assert got["n_tokens"] == ref["n_tokens"] < 6 * CTX  # special tokens are not counted
    np.testing.assert_allclose(got["per_layer"]["fvu"], ref["fvu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["per_layer"]["delta_ce"], ref["delta_ce"], atol=1e-5)
    assert got["mean"]["fvu"] == pytest.approx(np.mean(ref["fvu"]), rel=1e-5, abs=1e-6)
    assert got["dead_fraction"] == pytest.approx(ref["dead_fraction"])
    assert all(v > 0 for v in got["per_layer"]["kl"])
    assert all(0 < v <= 4 for v in got["per_layer"]["l0"])


def test_model_path_and_single_layer_on_any_layer(setup, tmp_path):
    root, model, mdir, data = setup
    res = evaluate_command(
        root / "l0",
        tmp_path / "a.json",
        **_opts(layers=[1, 2], model=mdir, dataset=data, tokens=6 * CTX, ce=False),
    )
    assert res.layers == [1, 2] and res.per_layer.delta_ce == [None, None]
    # the model path on the test split sees the same tokens as the test cache
    ref = _reference(root, model, root / "l0" / "sae", [1, 2])
    assert res.n_tokens == ref["n_tokens"]
    np.testing.assert_allclose(res.per_layer.fvu, ref["fvu"], rtol=1e-4, atol=1e-6)


def test_cross_matrix(setup, tmp_path):
    root, _, _, _ = setup
    cross = cross_command(
        root / "mlsae",
        [root / "l2", root / "l0"],
        tmp_path / "cross",
        **_opts(cache=root / "cache_test", batch_size=3),
    )
    cross_figures(cross, tmp_path / "cross")
    assert cross.rows == ["L0", "L2", "MLSAE"] and cross.layers == [0, 1, 2]
    assert json.loads((tmp_path / "cross" / "cross.json").read_text())["rows"] == cross.rows
    for key in ("fvu", "delta_ce"):
        assert (tmp_path / "cross" / f"cross_{key}.png").stat().st_size > 1000
        assert np.array(cross.matrix(key), dtype=float).shape == (3, 3)
    one = evaluate_command(
        root / "l2", tmp_path / "b.json", **_opts(layers=[0], cache=root / "cache_test")
    )
    assert cross.fvu[1][0] == pytest.approx(one.per_layer.fvu[0], rel=1e-5, abs=1e-6)
    assert cross.delta_ce[1][0] == pytest.approx(one.per_layer.delta_ce[0], abs=1e-6)
    ml = evaluate_command(
        root / "mlsae", tmp_path / "c.json", **_opts(cache=root / "cache_test", ce=False)
    )
    np.testing.assert_allclose(cross.fvu[2], ml.per_layer.fvu, rtol=1e-5, atol=1e-6)


def _context_moments(root: Path, sae_dir: Path, layer: int) -> list[tuple]:
    """Per test context: (vector count, sum of x, sum of ||x||^2, sum of ||x - x_hat||^2) of
    one SAE at one block, straight from the cache."""
    sae = load_sae(sae_dir, compute_dtype=torch.float32)
    ac = ActivationCache(root / "cache_test")
    shards = [ac.load_shard(i) for i in range(ac.n_shards)]
    acts = torch.cat([s.activations for s in shards])[:, ac.layers.index(layer)]
    mask = torch.cat([s.mask for s in shards])
    context = torch.arange(len(mask)) // CTX
    with torch.no_grad():
        x_hat = sae(acts[mask].float())[0].double()
    x, context = acts[mask].double(), context[mask]
    rows = []
    for c in range(int(context.max()) + 1):
        xs, err = x[context == c], (x - x_hat)[context == c]
        rows.append((len(xs), xs.sum(0), float((xs**2).sum()), float((err**2).sum())))
    return rows


def _pooled_fvu(rows: list[tuple], draw: np.ndarray) -> float:
    """FVU of the vectors of the drawn contexts pooled (with repeats): error over
    sum ||x||^2 - ||sum x||^2 / n."""
    n = sum(rows[c][0] for c in draw)
    total = sum(rows[c][1] for c in draw)
    square = sum(rows[c][2] for c in draw)
    err = sum(rows[c][3] for c in draw)
    return err / (square - float((total * total).sum()) / n)


def test_cross_diagonal_is_paired_over_contexts(setup, tmp_path):
    root, _, _, _ = setup
    boot = BootstrapConfig(bootstrap=200, bootstrap_seed=3)
    opts = _opts(cache=root / "cache_test", batch_size=3)
    cross = cross_command(
        root / "mlsae", [root / "l2", root / "l0"], tmp_path / "c", **opts, boot=boot
    )
    assert [(p.sae, p.layer) for p in cross.diagonal] == [("L0", 0), ("L2", 2)]
    assert cross.bootstrap is not None and cross.bootstrap.n_contexts == 6
    draws = resample_indices(6, 200, 3)
    for r, (pair, run) in enumerate(zip(cross.diagonal, ("l0", "l2"), strict=True)):
        col = cross.layers.index(pair.layer)
        assert pair.fvu_ratio == pytest.approx(cross.fvu[2][col] / cross.fvu[r][col], rel=1e-9)
        ce = cross.delta_ce[2][col] - cross.delta_ce[r][col]
        assert pair.delta_ce_diff == pytest.approx(ce, rel=1e-9, abs=1e-12)
        # the same draws for both SAEs: a loop over them, from the cache's vectors
        ml = _context_moments(root, root / "mlsae" / "sae", pair.layer)
        one = _context_moments(root, root / run / "sae", pair.layer)
        ratios = [_pooled_fvu(ml, d) / _pooled_fvu(one, d) for d in draws]
        low, high = np.percentile(ratios, [2.5, 97.5])
        iv = pair.fvu_ratio_interval
        assert iv is not None and iv.low == pytest.approx(low, rel=1e-4)
        assert iv.high == pytest.approx(high, rel=1e-4)
        assert pair.delta_ce_diff_interval is not None
        assert pair.delta_ce_diff_interval.low <= pair.delta_ce_diff_interval.high
    saved = json.loads((tmp_path / "c" / "cross.json").read_text())
    assert [p["layer"] for p in saved["diagonal"]] == [0, 2]
    assert "paired over 6 contexts" in format_cross(cross) and "within 10%" in format_cross(cross)


def test_bad_inputs(setup, tmp_path):
    root, _, mdir, data = setup
    out = tmp_path / "x.json"
    with pytest.raises(MlsaeError, match="train split"):
        evaluate_command(root / "mlsae", out, **_opts(cache=root / "cache_train"))
    with pytest.raises(MlsaeError, match="held-out"):
        evaluate_command(root / "mlsae", out, **_opts(model=mdir, dataset=data, split="train"))
    cfg = SaeConfig(d_in=16, expansion_factor=2, k=4, layers=[0], model=mdir)
    SparseAutoencoder(cfg).save(tmp_path / "narrow")
    with pytest.raises(MlsaeError, match="d_in 16"):
        evaluate_command(tmp_path / "narrow", out, **_opts(model=mdir, dataset=data, ce=False))
    with pytest.raises(MlsaeError, match="d_in 16"):
        evaluate_command(tmp_path / "narrow", out, **_opts(cache=root / "cache_test", ce=False))
    with pytest.raises(MlsaeError, match="missing from cache"):
        evaluate_command(root / "l0", out, **_opts(layers=[0, 3], cache=root / "cache_test"))
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code != 0 and isinstance(res.exception, MlsaeError)
    assert not out.exists()
