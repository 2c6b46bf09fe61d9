"""Residual-stream capture (SPEC section 1) on tiny GPT-NeoX, Llama and GPT-2 models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import N_LAYERS

from mlsae.core.errors import MlsaeError
from mlsae.core.layers import check_layers, iter_layers_arg
from mlsae.data.capture import (
    capture,
    get_blocks,
    get_final_norm,
    special_ids_of,
    truncated_forward,
    unembed,
    used_mask,
)

B, T = 2, 12


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids with BOS first, an EOS inside, and right padding (attention 0) in row 1."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (B, T), generator=g)
    ids[:, 0] = tokenizer.bos_token_id
    ids[0, 5] = tokenizer.eos_token_id
    ids[1, -3:] = tokenizer.pad_token_id
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -3:] = 0
    return ids, attn


@torch.no_grad()
def _reference(model, ids, attn):
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
    return out.hidden_states, out.logits


def test_inner_blocks_equal_hidden_states(tiny_model, tokenizer):
    ids, attn = _batch(tokenizer)
    hs, _ = _reference(tiny_model, ids, attn)
    assert len(hs) == N_LAYERS + 1  # embeddings + one per block
    got = capture(tiny_model, ids, range(N_LAYERS), attention_mask=attn)
    assert got.shape == (B, T, N_LAYERS, tiny_model.config.hidden_size)
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(got[:, :, layer], hs[layer + 1], rtol=0, atol=1e-6)
    # embeddings are not a layer: block 0's output differs from the embedding output
    assert not torch.allclose(got[:, :, 0], hs[0], atol=1e-3)


def _truncated_copy(model, n: int):
    """An independent model: a copy keeping only blocks 0..n-1 (no hooks involved)."""
    m = copy.deepcopy(model)
    del get_blocks(m)[n:]
    m.config.num_hidden_layers = n
    return m


def test_blocks_match_truncated_models(tiny_model, tokenizer):
    """Independent of HF's hidden_states (recorded by hooks in transformers 5): a model cut
    after block l computes final_norm(x_l) and its logits by itself."""
    ids, attn = _batch(tokenizer)
    got = capture(tiny_model, ids, range(N_LAYERS), attention_mask=attn)
    with torch.no_grad():
        for layer in range(N_LAYERS):
            logits = _truncated_copy(tiny_model, layer + 1)(
                input_ids=ids, attention_mask=attn
            ).logits
            mine = unembed(tiny_model, get_final_norm(tiny_model)(got[:, :, layer]))
            torch.testing.assert_close(mine, logits, rtol=1e-4, atol=1e-4)
        other = unembed(tiny_model, get_final_norm(tiny_model)(got[:, :, 0]))
        assert not torch.allclose(other, logits, atol=1e-3)  # layers really differ


def test_last_block_is_pre_final_norm(tiny_model, tokenizer):
    ids, attn = _batch(tokenizer)
    hs, logits = _reference(tiny_model, ids, attn)
    last = capture(tiny_model, ids, [N_LAYERS - 1], attention_mask=attn)[:, :, 0]
    # HF's last hidden state is post-norm, so the captured pre-norm value differs from it...
    assert not torch.allclose(last, hs[-1], atol=1e-3)
    with torch.no_grad():
        normed = get_final_norm(tiny_model)(last)
        # ...and the model's own final norm maps it onto hidden_states[-1] and the logits.
        torch.testing.assert_close(normed, hs[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unembed(tiny_model, normed), logits, rtol=1e-4, atol=1e-4)


def test_layer_subset_matches_full(tiny_model, tokenizer):
    ids, attn = _batch(tokenizer)
    full = capture(tiny_model, ids, range(N_LAYERS), attention_mask=attn)
    sub = capture(tiny_model, ids, [2, 0], attention_mask=attn)  # returned in sorted order
    assert sub.shape[2] == 2
    torch.testing.assert_close(sub[:, :, 0], full[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(sub[:, :, 1], full[:, :, 2], rtol=0, atol=0)


def _count_calls(model):
    counts = {"blocks": [0] * N_LAYERS, "norm": 0}
    handles = []
    for i, blk in enumerate(get_blocks(model)):

        def hook(_m, _i, _o, i=i):
            counts["blocks"][i] += 1

        handles.append(blk.register_forward_hook(hook))

    def norm_hook(_m, _i, _o):
        counts["norm"] += 1

    handles.append(get_final_norm(model).register_forward_hook(norm_hook))
    return counts, handles


@pytest.mark.parametrize("layers", [[0], [1], [0, 1]])
def test_forward_stops_after_last_needed_block(tiny_model, tokenizer, layers):
    ids, attn = _batch(tokenizer)
    counts, handles = _count_calls(tiny_model)
    try:
        capture(tiny_model, ids, layers, attention_mask=attn)
    finally:
        for h in handles:
            h.remove()
    stop = max(layers)
    assert counts["blocks"] == [1 if i <= stop else 0 for i in range(N_LAYERS)]
    assert counts["norm"] == 0


def test_truncated_forward_stops_and_hooks_removed(tiny_model, tokenizer):
    ids, _ = _batch(tokenizer)
    counts, handles = _count_calls(tiny_model)
    try:
        truncated_forward(tiny_model, ids, 1)
    finally:
        for h in handles:
            h.remove()
    assert counts["blocks"] == [1, 1, 0] and counts["norm"] == 0
    # no hooks left behind by capture/truncated_forward, even after the abort
    capture(tiny_model, ids, [0])
    assert all(len(b._forward_hooks) == 0 for b in get_blocks(tiny_model))
    with torch.no_grad():
        tiny_model(input_ids=ids)  # a normal forward still runs to the end


def test_used_mask_masks_special_and_padding(tokenizer):
    ids, attn = _batch(tokenizer)
    special = special_ids_of(tokenizer)
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} <= set(special)
    mask = used_mask(ids, special, attention_mask=attn)
    # independent expectation, position by position
    want = torch.tensor(
        [[int(ids[b, t]) not in special and bool(attn[b, t]) for t in range(T)] for b in range(B)]
    )
    assert torch.equal(mask, want)
    assert not mask[:, 0].any() and not mask[0, 5] and not mask[1, -3:].any()
    assert mask.sum() == B * T - 2 - 1 - 3
    # padding with a non-special id is still masked by the attention mask
    ids2 = ids.clone()
    ids2[1, -3:] = 65
    assert not used_mask(ids2, special, attention_mask=attn)[1, -3:].any()
    assert used_mask(ids2, special)[1, -3:].all()


def test_layers_out_of_range(tiny_model, tokenizer):
    ids, _ = _batch(tokenizer)
    for bad in ([N_LAYERS], [-1], [0, N_LAYERS + 5], []):
        with pytest.raises(MlsaeError, match="out of range"):
            capture(tiny_model, ids, bad)
    assert check_layers([2, 0, 2], N_LAYERS) == [0, 2]


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        (None, [0, 1, 2, 3, 4, 5]),
        ("all", [0, 1, 2, 3, 4, 5]),
        (" ALL ", [0, 1, 2, 3, 4, 5]),
        ("", [0, 1, 2, 3, 4, 5]),
        ("3", [3]),
        ("0,5,2", [0, 2, 5]),
        ("1-3", [1, 2, 3]),
        ("4-5, 0", [0, 4, 5]),
        ("2,2,1-2", [1, 2]),
    ],
)
def test_iter_layers_arg(spec, want):
    assert iter_layers_arg(spec, 6) == want


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("a", "cannot parse"),
        ("1-x", "cannot parse"),
        ("0,,1", "cannot parse"),
        ("1.5", "cannot parse"),
        ("6", "out of range"),
        ("4-7", "out of range"),
        ("-1", "start at 0"),
        ("3-1", "range 3-1 is empty"),
    ],
)
def test_iter_layers_arg_errors(spec, msg):
    with pytest.raises(MlsaeError, match=msg):
        iter_layers_arg(spec, 6)


def test_special_ids_include_added_special_tokens():
    from conftest import make_tokenizer
    from tokenizers import AddedToken

    tok = make_tokenizer()
    tok.add_tokens([AddedToken("<file_sep>", special=True), AddedToken("<plain>", special=False)])
    ids = special_ids_of(tok)
    assert tok.convert_tokens_to_ids("<file_sep>") in ids
    assert tok.convert_tokens_to_ids("<plain>") not in ids
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} <= set(ids)
    assert not set(range(256)) & set(ids)  # byte tokens are ordinary
