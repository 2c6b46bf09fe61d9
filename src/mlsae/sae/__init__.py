"""Stage 3, the SAE: the base class and one module per architecture (registry: topk, batchtopk,
matryoshka, token_topk), its kernels, FVU and streaming metrics, SAE and run folders.
May import: core."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlsae.sae.autoencoder import EncoderOutput, SparseAutoencoder
    from mlsae.sae.folders import load_sae


def __getattr__(name: str) -> object:  # lazy: `import mlsae.sae` stays free of torch
    if name in ("SparseAutoencoder", "EncoderOutput"):
        from mlsae.sae import autoencoder

        return getattr(autoencoder, name)
    if name == "load_sae":
        from mlsae.sae.folders import load_sae

        return load_sae
    raise AttributeError(name)


__all__ = ["EncoderOutput", "SparseAutoencoder", "load_sae"]
