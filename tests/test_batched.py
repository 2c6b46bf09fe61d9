"""Batched continuations (eval/batched.py) vs one layer at a time and vs plain hooked forwards."""

from __future__ import annotations

import pytest
import torch

from mlsae.eval import batched
from mlsae.eval.batched import splice_layers
from mlsae.eval.splice import clean_pass, splice


def _recon(h: torch.Tensor) -> torch.Tensor:
    return h.flip(0) * 2.0  # other positions' vectors, scaled: a visible change


def _setup(tokenizer, b=3, t=12, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    ids[:, 0] = tokenizer.bos_token_id
    attn = None
    if pad:
        attn = torch.ones(b, t, dtype=torch.long)
        attn[1, t - 4 :] = 0
        ids[1, t - 4 :] = tokenizer.pad_token_id
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return ids, attn, special


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("b", [1, 3])
def test_batched_equals_one_layer_at_a_time(tiny_model, tokenizer, pad, b):
    ids, attn, special = _setup(tokenizer, b=b, pad=pad and b > 1)
    cp = clean_pass(tiny_model, ids, [0, 1, 2], special, attention_mask=attn, mode="direct")
    recons = {layer: _recon(cp.vectors(layer)) for layer in (0, 1, 2)}
    batched._BATCHABLE.pop(tiny_model, None)
    got = splice_layers(tiny_model, cp, recons)
    assert batched._BATCHABLE[tiny_model] is True  # the check passed, no fallback
    for layer in (0, 1, 2):
        ref = splice(tiny_model, cp, layer, recons[layer])
        assert got[layer].n == ref.n > 0
        assert abs(got[layer].ce_sum - ref.ce_sum) / ref.n < 1e-6
        assert abs(got[layer].kl_sum - ref.kl_sum) / ref.n < 1e-6
        assert ref.kl_sum / ref.n > 1e-3  # the reconstruction changes the predictions


def test_batched_matches_hooked_reference(tiny_model, tokenizer):
    from conftest import hooked_delta_ce

    ids, _, special = _setup(tokenizer, seed=1)
    used = ~torch.isin(ids, torch.tensor(special))
    cp = clean_pass(tiny_model, ids, [0, 1, 2], used=used)
    got = splice_layers(tiny_model, cp, {la: _recon(cp.vectors(la)) for la in (0, 1, 2)})
    for layer in (0, 1, 2):
        with torch.no_grad():
            ref = hooked_delta_ce(tiny_model, ids, used, layer, _recon)
        assert got[layer].ce_sum / got[layer].n == pytest.approx(ref, abs=1e-6)


def test_groups_and_layer_subsets(tiny_model, tokenizer, monkeypatch):
    """Several groups (a small token budget) and a subset of layers give the same numbers."""
    ids, _, special = _setup(tokenizer, seed=2)
    cp = clean_pass(tiny_model, ids, [1, 2], special)
    recons = {la: _recon(cp.vectors(la)) for la in (1, 2)}
    monkeypatch.setattr(batched, "BATCH_TOKENS", ids.numel())  # one layer per group
    got = splice_layers(tiny_model, cp, recons)
    for layer in (1, 2):
        ref = splice(tiny_model, cp, layer, recons[layer])
        assert abs(got[layer].ce_sum - ref.ce_sum) < 1e-5 and got[layer].n == ref.n
    assert splice_layers(tiny_model, cp, {}) == {}


def test_mismatch_falls_back_to_one_layer_at_a_time(tiny_model, tokenizer, monkeypatch, caplog):
    ids, _, special = _setup(tokenizer, seed=3)
    cp = clean_pass(tiny_model, ids, [0, 1, 2], special)
    recons = {la: _recon(cp.vectors(la)) for la in (0, 1, 2)}
    real = batched._continue_group

    def broken(model, cp, recons):  # a model whose blocks do not batch: wrong states
        for layer, h in real(model, cp, recons):
            yield layer, h * 0.5

    monkeypatch.setattr(batched, "_continue_group", broken)
    batched._BATCHABLE.pop(tiny_model, None)
    got = splice_layers(tiny_model, cp, recons)
    assert batched._BATCHABLE[tiny_model] is False and "one layer at a time" in caplog.text
    for layer in (0, 1, 2):
        one = splice(tiny_model, cp, layer, recons[layer])
        assert got[layer] == one
        assert got[layer].rows is not None and one.rows is not None
        assert torch.equal(got[layer].rows, one.rows)  # the per-context sums as well
    batched._BATCHABLE.pop(tiny_model, None)
