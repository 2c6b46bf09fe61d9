"""Stage 4, interchange: SAEs in and out of mlsae. Owns the SAELens 6.x export (one folder per
block hook), the hub-ready folder with its model card, and the importers of sparsify folders,
SAELens TopK folders and the paper's Hugging Face checkpoints (tim-lawson/mlsae) into mlsae's
SAE folder; `load_any` loads any of them (or fetches an `org/name` hub repo).
May import: core, data, lens, activations, sae."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlsae.interchange.convert import import_command, load_any
    from mlsae.interchange.hub import export_hub
    from mlsae.interchange.saelens import export_saelens

_LAZY = {
    "import_command": "convert",
    "load_any": "convert",
    "export_hub": "hub",
    "export_saelens": "saelens",
}


def __getattr__(name: str) -> object:  # lazy: `import mlsae.interchange` stays free of torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mlsae.interchange.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = ["export_hub", "export_saelens", "import_command", "load_any"]
