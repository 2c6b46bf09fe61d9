"""Shared fixtures: a tiny byte-level tokenizer and tiny random GPT-NeoX / Llama / GPT-2 models
built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

ARCHS = ["gpt_neox", "llama", "gpt2"]
N_LAYERS, D_MODEL = 3, 32


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are bytes (as GPT-2 byte chars), then special tokens."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {"eos_token": "<|endoftext|>", "bos_token": "<|bos|>", "pad_token": "<|pad|>"}
    )
    return fast


def make_model(arch: str, vocab_size: int, n_layers: int = N_LAYERS, d: int = D_MODEL):
    """A tiny randomly initialised causal LM of the given architecture (deterministic)."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 3)
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=4 * d,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "llama":
        cfg = LlamaConfig(
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=3 * d,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=d, n_layer=n_layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Random init leaves LayerNorm at identity and small weights; perturb so layers differ.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch, tokenizer):
    return make_model(arch, vocab_size=len(tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path: Path, arch, tokenizer) -> Path:
    """A tiny model + tokenizer saved as an HF folder, loadable with from_pretrained."""
    model = make_model(arch, vocab_size=len(tokenizer))
    out = tmp_path / f"tiny-{arch}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """Tiny ops run faster on one thread, and are immune to other processes' load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven"]


def write_word_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """A JSONL corpus of short random word documents ({"text": ...} per line)."""
    import json

    import numpy as np

    g = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(g.choice(WORDS, size=g.integers(3, 9)))}) + "\n")
    return path


@torch.no_grad()
def hooked_delta_ce(model, ids, used, layer: int, recon) -> float:
    """Reference delta CE by two plain full forwards, the second with a hook replacing block
    `layer`'s output at `used` positions by recon(h[used]) ([N, d] -> [N, d]). Every target
    exists in these fixed-length contexts; predictions from used positions count."""
    import torch.nn.functional as F

    from mlsae.data.capture import get_blocks

    def hook(_m, _i, o):
        h = (o[0] if isinstance(o, tuple) else o).clone()
        h[used] = recon(h[used]).to(h.dtype)
        return (h, *o[1:]) if isinstance(o, tuple) else h

    clean = F.log_softmax(model(input_ids=ids).logits, -1)
    handle = get_blocks(model)[layer].register_forward_hook(hook)
    spliced = F.log_softmax(model(input_ids=ids).logits, -1)
    handle.remove()
    tgt = ids[:, 1:, None]
    ce = (clean[:, :-1].gather(2, tgt) - spliced[:, :-1].gather(2, tgt)).squeeze(2)
    return float(ce[used[:, :-1]].mean())


def model_with_test_cache(root: Path, arch: str, tokenizer, context_length: int):
    """A tiny model of `arch` saved in root/model with the tokenizer, the word corpus in
    root/docs.jsonl and a float32 test-split cache of 4 contexts in root/cache_test; returns
    (model, model folder, corpus path)."""
    from mlsae.activations.extract import build_cache
    from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SourceConfig
    from mlsae.core.inputs import Inputs

    model = make_model(arch, len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_word_corpus(root / "docs.jsonl")
    mdir, data = str(root / "model"), str(root / "docs.jsonl")
    build_cache(
        root / "cache_test",
        Inputs(
            SourceConfig(tokens=4 * context_length, batch_size=4),
            DataConfig(dataset=data, split="test", context_length=context_length),
            ModelConfig(model=mdir),
        ),
        ExtractConfig(storage_dtype="float32", shard_tokens=2 * context_length),
    )
    return model, mdir, data
