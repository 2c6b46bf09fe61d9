"""mlsae: multi-layer sparse autoencoders for residual-stream analysis, CPU-first and offline."""

from __future__ import annotations

__version__ = "0.1.0"


def load_sae(path):  # noqa: ANN001, ANN201 - thin lazy re-export
    """Load a saved SAE folder (cfg.json + sae.safetensors). See mlsae.sae.autoencoder.load_sae."""
    from mlsae.sae.folders import load_sae as _load

    return _load(path)


__all__ = ["__version__", "load_sae"]
