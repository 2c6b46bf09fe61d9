"""The SAE architectures by name: `cfg.architecture` -> the `SparseAutoencoder` subclass that
implements it (imported on first use, so this module stays free of torch for `mlsae --help`).

Adding an architecture: one module in mlsae/sae/ with its subclass (docs/architectures.md says
what it must implement), one line here, its name in `mlsae.core.config.Architecture` (the
--architecture choices; tests/test_architectures.py checks the two agree).
"""

from __future__ import annotations

import importlib

from mlsae.core.errors import MlsaeError

ARCHITECTURES: dict[str, str] = {
    "topk": "mlsae.sae.topk:TopKSAE",
    "batchtopk": "mlsae.sae.batchtopk:BatchTopKSAE",
    "matryoshka": "mlsae.sae.matryoshka:MatryoshkaSAE",
    "token_topk": "mlsae.sae.token_topk:TokenTopKSAE",
    "crosscoder": "mlsae.sae.crosscoder:CrosscoderSAE",
}
"""name -> "module:class" of its SparseAutoencoder subclass."""


def sae_class(name: str) -> type:
    """The class of architecture `name` (a `mlsae.sae.autoencoder.SparseAutoencoder` subclass;
    imported by it, hence not typed here); MlsaeError naming the known ones otherwise."""
    if name not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise MlsaeError(f"unknown SAE architecture {name!r} (known: {known})")
    module, cls = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), cls)
