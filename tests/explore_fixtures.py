"""A tiny model, cache, MLSAE run and explorer index shared by the explorer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_model, make_tokenizer, write_word_corpus

from mlsae.activations.extract import build_cache
from mlsae.core.config import DataConfig, ModelConfig, SaeConfig
from mlsae.sae.autoencoder import SparseAutoencoder

D, CTX, LAYERS = 32, 24, [0, 1, 2]


def make_sae(layers: list[int], seed: int = 0, expansion: int = 2, k: int = 5):
    sae = SparseAutoencoder(
        SaeConfig(d_in=D, expansion_factor=expansion, k=k, layers=layers),
        seed=seed,
        compute_dtype=torch.float32,
    )
    with torch.no_grad():  # spread the biases so latents differ in frequency
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return sae


def build_world(root: Path, arch: str = "llama", n_tokens: int = 480) -> dict[str, Path]:
    """model dir, float32 cache of every layer (test split of a word corpus), an MLSAE run."""
    tok = make_tokenizer()
    model = make_model(arch, vocab_size=len(tok))
    mdir = root / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    corpus = write_word_corpus(root / "corpus.jsonl", n_docs=400)
    data = DataConfig(dataset=str(corpus), split="train", context_length=CTX)
    build_cache(root / "cache", ModelConfig(model=str(mdir)), data, n_tokens,
                storage_dtype="float32", shard_tokens=5 * CTX, batch_size=3)  # fmt: skip
    make_sae(LAYERS).save(root / "run" / "sae")
    return {"model": mdir, "cache": root / "cache", "run": root / "run", "corpus": corpus}
