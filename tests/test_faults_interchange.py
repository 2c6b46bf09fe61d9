"""Interchange details found by the issue-29 probes: the hub model card prints the learning rate
a run used (the default rule's value when --lr was not given, not `None`), and the hook names
of `--model gemma3-270m` resolve like every other model's."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig

from mlsae.core.config import SaeConfig
from mlsae.data import model as data_model
from mlsae.interchange.hub import model_card
from mlsae.interchange.meta import block_hook_names
from mlsae.sae.autoencoder import SparseAutoencoder


@pytest.mark.parametrize(("lr", "want"), [(None, 1e-3 * math.sqrt(4608 / 64)), (0.002, 0.002)])
def test_model_card_prints_the_learning_rate_used(lr, want):
    sae = SparseAutoencoder(SaeConfig(d_in=16, expansion_factor=4, k=2, layers=[0, 1]))
    context = {"train_cfg": {"train": {"batch_tokens": 64, "lr": lr}}, "context_size": 64}
    card = model_card(sae, "org/name", context, None, [])
    (row,) = [r for r in card.splitlines() if r.startswith("| lr |")]
    assert "None" not in row
    value = float(row.split("|")[2].split()[0])
    assert value == pytest.approx(want, rel=1e-2)  # printed to 3 significant digits


def test_gemma3_alias_resolves_its_hook_names(tmp_path, monkeypatch):
    """`--model gemma3-270m` reads the config of its GGUF's cache, as `load_model` loads it
    (here a tiny Gemma 3 config standing for the real one: no download)."""
    gguf = tmp_path / "gemma-3-270m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(data_model, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(data_model, "gemma_gguf_path", lambda: gguf)
    cfg = AutoConfig.for_model(
        "gemma3_text",
        num_hidden_layers=3,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=64,
    )
    cfg.save_pretrained(data_model.gguf_cache_dir(gguf))
    assert block_hook_names("gemma3-270m") == ["model.layers.0", "model.layers.1", "model.layers.2"]
