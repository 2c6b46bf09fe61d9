"""Splicing: identity, agreement with a manual full forward, layer subsets, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlsae.core.errors import MlsaeError
from mlsae.data.capture import get_blocks
from mlsae.eval.splice import clean_pass, predicted_mask, splice, spliced_logp


def _ids(tok, b=2, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, t), generator=g)
    ids[:, 0] = tok.bos_token_id
    ids[0, 9] = tok.eos_token_id  # a document boundary inside the context
    return ids


def _special(tok):
    return [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]


@torch.no_grad()
def _manual_logp(model, ids, layer, used, x_hat, attention_mask=None):
    """Independent reference: full forward, block `layer` output replaced at used positions."""

    def hook(_m, _inp, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[used] = x_hat
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = get_blocks(model)[layer].register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()
    return F.log_softmax(logits.float(), -1)  # [B, T, V]


@pytest.mark.parametrize("mode", ["direct", "hook"])
def test_identity_gives_zero(tiny_model, tokenizer, mode):
    ids = _ids(tokenizer)
    cp = clean_pass(tiny_model, ids, [0, 1, 2], _special(tokenizer), mode=mode)
    assert cp.mode == mode
    for layer in (0, 1, 2):
        s = splice(tiny_model, cp, layer, cp.vectors(layer))
        assert s.n == cp.n_pred > 0
        assert abs(s.ce_sum / s.n) < 1e-5 and abs(s.kl_sum / s.n) < 1e-5


def test_matches_manual_forward_and_paths_agree(tiny_model, tokenizer):
    ids = _ids(tokenizer, seed=1)
    cp = clean_pass(tiny_model, ids, [0, 1, 2], _special(tokenizer), mode="auto")
    assert cp.mode == "direct"  # the generic direct path works for GPT-NeoX, Llama and GPT-2
    cp_hook = clean_pass(tiny_model, ids, [0, 1, 2], _special(tokenizer), mode="hook")
    with torch.no_grad():
        clean_ref = F.log_softmax(tiny_model(input_ids=ids).logits.float(), -1)[cp.pred]  # [P, V]
    torch.testing.assert_close(cp.clean_p, clean_ref.exp(), atol=1e-6, rtol=1e-5)
    t = cp.targets[:, None]
    g = torch.Generator().manual_seed(0)
    for layer in (0, 1, 2):
        x = cp.vectors(layer)
        x_hat = x + torch.randn(x.shape, generator=g) * x.std()
        ref = _manual_logp(tiny_model, ids, layer, cp.used, x_hat)[cp.pred]
        direct = spliced_logp(tiny_model, cp, layer, x_hat)
        assert (direct - clean_ref).abs().max() > 1e-2  # the change is visible
        torch.testing.assert_close(direct, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(spliced_logp(tiny_model, cp_hook, layer, x_hat), ref)
        # delta CE and KL against the textbook formulas on the manual forward
        ce = (clean_ref.gather(1, t) - ref.gather(1, t)).sum()
        kl = (clean_ref.exp() * (clean_ref - ref)).sum()
        for c in (cp, cp_hook):
            s = splice(tiny_model, c, layer, x_hat)
            assert s.n == cp.n_pred
            assert s.ce_sum == pytest.approx(float(ce), abs=1e-4)
            assert s.kl_sum == pytest.approx(float(kl), abs=1e-4) and s.kl_sum > 0


@torch.no_grad()
def test_corrupted_vector_raises_loss(tiny_model, tokenizer):
    """On greedy continuations (targets = the clean argmax), any corruption raises CE."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = tokenizer.bos_token_id
    for _ in range(12):
        nxt = tiny_model(input_ids=ids).logits[:, -1, :256].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    ids = ids[:, :-1]
    cp = clean_pass(tiny_model, ids, [0, 1], _special(tokenizer))
    for layer in (0, 1):
        x = cp.vectors(layer)
        noisy = x + torch.randn_like(x) * 3 * x.std()
        s = splice(tiny_model, cp, layer, noisy)
        assert s.ce_sum / s.n > 1e-3 and s.kl_sum / s.n > 1e-3


def test_layer_subset_splices_at_its_block(tiny_model, tokenizer):
    """Layers [1, 2]: layer 2 is block 2 (not block 1, its index in the subset)."""
    ids = _ids(tokenizer, seed=3)
    cp = clean_pass(tiny_model, ids, [1, 2], _special(tokenizer))
    assert sorted(cp.hidden) == [1, 2] and min(cp.block_inputs) == 2
    x_hat = cp.vectors(2) * 1.5 + 0.5
    got = spliced_logp(tiny_model, cp, 2, x_hat)
    right = _manual_logp(tiny_model, ids, 2, cp.used, x_hat)[cp.pred]
    wrong = _manual_logp(tiny_model, ids, 1, cp.used, x_hat)[cp.pred]
    torch.testing.assert_close(got, right, atol=1e-5, rtol=0)
    assert (got - wrong).abs().max() > 1e-2
    with pytest.raises(MlsaeError, match="not kept"):
        spliced_logp(tiny_model, cp, 0, x_hat)


def test_special_and_padding_positions_never_counted(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[bos, 5, 6, eos, 7, 8, 9, 10], [bos, 11, 12, 13, 14, pad, pad, pad]])
    attn = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    used = ~torch.isin(ids, torch.tensor([bos, eos, pad])) & attn.bool()
    pred = predicted_mask(used, attn)
    # from used positions only; the target must exist (not the last) and not be padding
    expect = [[0, 1, 1, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    assert pred.int().tolist() == expect


def test_padding_and_specials_in_a_batch(tokenizer):
    from conftest import make_model

    model = make_model("llama", len(tokenizer))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[bos, 5, 6, eos, 7, 8, 9, 10], [bos, 11, 12, 13, 14, pad, pad, pad]])
    attn = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    cp = clean_pass(model, ids, [0], [bos, eos, pad], attention_mask=attn)
    assert cp.n_pred == 8 and int(cp.used.sum()) == 10
    assert cp.targets.tolist() == [6, eos, 8, 9, 10, 12, 13, 14]
    x = cp.vectors(0)
    s = splice(model, cp, 0, x)
    assert abs(s.ce_sum) < 1e-5 and abs(s.kl_sum) < 1e-5
    with pytest.raises(MlsaeError, match="shape"):
        splice(model, cp, 0, x[:-1])
