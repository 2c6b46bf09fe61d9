"""mlsae: multi-layer sparse autoencoders for residual-stream analysis, CPU-first and offline."""

from __future__ import annotations

__version__ = "0.1.0"


def load_sae(path, compute_dtype=None, **kw):  # noqa: ANN001, ANN201 - thin lazy re-export
    """Load an SAE: an mlsae SAE or run folder (cfg.json + sae.safetensors), a sparsify, SAELens
    or tim-lawson/mlsae checkpoint folder, or an `org/name` Hugging Face repo of any of these
    (fetched through huggingface_hub when the hub is reachable; its cache otherwise).
    kw: model, layers, for sources that do not record them. See mlsae.interchange.load_any."""
    from mlsae.interchange.convert import load_any

    return load_any(path, compute_dtype=compute_dtype, **kw)


__all__ = ["__version__", "load_sae"]
