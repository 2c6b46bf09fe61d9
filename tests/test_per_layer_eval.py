"""`mlsae evaluate` of a per-layer set keeps what one SAE's evaluation reports: the bootstrap
intervals (the same resamples, so the same interval as evaluating that SAE alone) and, where a
block has norm outliers, fvu_typical."""

from __future__ import annotations

import pytest
import torch

from mlsae.activations.cache import CacheWriter
from mlsae.core.config import SaeGridConfig, SourceConfig, TrainConfig
from mlsae.core.inputs import Inputs
from mlsae.core.stage_config import EvalConfig
from mlsae.eval.evaluate import evaluate_command
from mlsae.eval.several import evaluate_run
from mlsae.train.loop import train_command

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache(path, n_tokens=1024, d=16, outlier_every=97):
    """Sparse combinations of a random dictionary at blocks 0 and 1; every outlier_every-th
    token scaled 100x at both blocks (norm outliers)."""
    g = torch.Generator().manual_seed(0)
    dic = torch.randn(2, 40, d, generator=g)
    meta = {
        "layers": [0, 1],
        "d_model": d,
        "model": "synthetic",
        "dataset": "synthetic",
        "split": "test",
        "context_length": 64,
    }
    w = CacheWriter(path, meta, shard_tokens=256, storage_dtype="float32")
    for start in range(0, n_tokens, 128):
        z = torch.zeros(128, 2, 40).scatter_(
            2, torch.randint(0, 40, (128, 2, 3), generator=g), torch.rand(128, 2, 3, generator=g)
        )
        acts = torch.einsum("nlj,ljd->nld", z, dic) + 0.01 * torch.randn(128, 2, d, generator=g)
        pos = torch.arange(start, start + 128)
        acts[pos % outlier_every == 5] *= 100.0
        w.add(acts, torch.arange(128), torch.ones(128, dtype=torch.bool))
    w.close()
    return path


def test_per_layer_set_has_the_single_sae_intervals(tmp_path):
    cache = _cache(tmp_path / "cache")
    run = tmp_path / "pl"
    train_command(
        run,
        inputs=Inputs(SourceConfig(cache=str(cache))),
        sae=SaeGridConfig(expansion_factor=[2], k=[3], per_layer=True),
        train=TrainConfig(batch_tokens=64, lr=2e-3, dead_tokens=200, max_steps=8),
    )
    src, ev = (
        Inputs.held_out(SourceConfig(cache=str(cache))),
        EvalConfig(ce=False, allow_train=True),
    )
    both = evaluate_run(run, tmp_path / "set.json", inputs=src, ev=ev).to_json()
    alone = evaluate_command(run / "layer_01", tmp_path / "one.json", inputs=src, ev=ev).to_json()
    assert both["layers"] == [0, 1] and alone["layers"] == [1]
    assert both["intervals"] is not None
    for key in ("fvu", "fvu_typical"):
        assert both["per_layer"][key][1] == pytest.approx(alone["per_layer"][key][0], rel=1e-6)
        got, want = both["intervals"][key]["per_layer"][1], alone["intervals"][key]["per_layer"][0]
        assert got["low"] == pytest.approx(want["low"], rel=1e-6)
        assert got["high"] == pytest.approx(want["high"], rel=1e-6)
        assert got["low"] <= alone["per_layer"][key][0] <= got["high"] or key == "fvu_typical"
