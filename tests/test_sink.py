"""Attention-sink positions (SPEC 1): a tiny GPT-2 whose position 0 gets a huge residual norm.
With the default exclusion the metrics equal those computed on the other positions only; with
--no-exclude-sink they equal the earlier numbers (every non-special position); the norm-outlier
report finds the sink vectors and their variance share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, write_word_corpus

from mlsae.activations.cache import ActivationCache
from mlsae.activations.extract import build_cache
from mlsae.activations.norms import norm_outliers
from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SaeConfig, SourceConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import EvalConfig
from mlsae.data.capture import capture, special_ids_of
from mlsae.data.text import iter_contexts
from mlsae.eval.evaluate import evaluate_command
from mlsae.sae.autoencoder import SparseAutoencoder

CTX, D, LAYERS = 16, 32, [0, 1, 2]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sink")
    model = make_model("gpt2", len(tokenizer))
    with torch.no_grad():  # position 0's embedding dominates its residual at every block
        model.transformer.wpe.weight[0] = 400.0 * torch.randn(
            D, generator=torch.Generator().manual_seed(3)
        )
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpus = write_word_corpus(root / "docs.jsonl", n_docs=200)
    for name, sink in (("on", True), ("off", False)):
        build_cache(
            root / f"cache_{name}",
            Inputs(
                SourceConfig(tokens=8 * CTX, batch_size=4),
                DataConfig(
                    dataset=str(corpus), split="test", context_length=CTX, exclude_sink=sink
                ),
                ModelConfig(model=str(root / "model")),
            ),
            ExtractConfig(storage_dtype="float32"),
        )
    cfg = SaeConfig(d_in=D, expansion_factor=2, k=4, layers=LAYERS, model=str(root / "model"))
    SparseAutoencoder(cfg, seed=0, compute_dtype=torch.float32).save(root / "sae")
    return root, model, corpus


def _vectors(model, tokenizer, corpus: Path, sink: bool) -> tuple[np.ndarray, np.ndarray]:
    """Block outputs [n, L, d] and the counted-position mask [n], from an independent reading
    of the contexts: special tokens out, and position 0 out when sinks are excluded."""
    data = DataConfig(dataset=str(corpus), split="test", context_length=CTX, exclude_sink=sink)
    ids = torch.stack([c for _, c in zip(range(8), iter_contexts(tokenizer, data), strict=False)])
    if sink:
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        x = capture(model, ids, LAYERS).reshape(-1, len(LAYERS), D).double().numpy()
    special = torch.tensor(special_ids_of(tokenizer))
    keep = ~torch.isin(ids, special)
    if sink:
        keep[:, 0] = False
    return x, keep.reshape(-1).numpy()


def _fvu(sae_dir: Path, x: np.ndarray) -> float:
    from mlsae.sae.folders import load_sae

    sae = load_sae(sae_dir, compute_dtype=torch.float32)
    with torch.no_grad():
        x_hat = sae(torch.as_tensor(x, dtype=torch.float32))[0].double().numpy()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize("sink", [True, False])
def test_metrics_exclude_the_sink_by_default(world, tokenizer, tmp_path, sink) -> None:
    root, model, corpus = world
    name = "on" if sink else "off"
    res = evaluate_command(
        root / "sae",
        tmp_path / "e.json",
        inputs=Inputs.held_out(source=SourceConfig(cache=root / f"cache_{name}")),
        ev=EvalConfig(ce=False),
    )
    x, keep = _vectors(model, tokenizer, corpus, sink)
    for i in range(len(LAYERS)):
        assert res.per_layer.fvu[i] == pytest.approx(
            _fvu(root / "sae", x[keep, i]), rel=1e-5, abs=1e-6
        )
    assert res.n_tokens == int(keep.sum()) and res.exclude_sink is sink
    # the sink dominates the "off" numbers: its vectors carry most of every layer's variance
    rep = res.norm_outliers
    assert rep is not None
    if sink:
        assert sum(rep.n_outliers) == 0
    else:
        assert rep.n_outliers == [8] * len(LAYERS)  # one position 0 per context
        xs = x[keep]
        for i in range(len(LAYERS)):
            v = xs[:, i]
            n = np.linalg.norm(v, axis=1)
            out = n > 10 * np.median(n)
            share = ((v[out] - v.mean(0)) ** 2).sum() / ((v - v.mean(0)) ** 2).sum()
            assert rep.variance_share[i] == pytest.approx(share, rel=1e-5, abs=1e-6)
            assert share > 0.5
            # fvu_typical: the FVU over the other tokens, equal to the plain computation on them
            typ = _fvu(root / "sae", v[~out])
            assert res.per_layer.fvu_typical is not None
            assert res.per_layer.fvu_typical[i] == pytest.approx(typ, rel=1e-5, abs=1e-6)
            assert res.per_layer.fvu[i] != pytest.approx(typ, rel=1e-2)
    assert (res.per_layer.fvu_typical is not None) is (not sink)  # only when there are outliers


def test_manifest_records_the_choice_and_the_outliers(world) -> None:
    root = world[0]
    on, off = ActivationCache(root / "cache_on"), ActivationCache(root / "cache_off")
    assert on.manifest["exclude_sink"] is True and off.manifest["exclude_sink"] is False
    assert off.manifest["norm_outliers"] == norm_outliers(off).summary()
    assert sum(on.manifest["norm_outliers"]["n_outliers"]) == 0
