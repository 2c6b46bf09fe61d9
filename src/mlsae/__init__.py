# pyright: strict
"""mlsae: multi-layer sparse autoencoders for residual-stream analysis, CPU-first and offline.

The public API (docs/api.md): the pipeline's stages as calls with the CLI's names
(`load_model`, `activations`, `train` -> `Run`, `evaluate`, `analyze`, `evolution`,
`train_lens`, `evaluate_lens`), a run's per-prompt helpers (`Run.layer_distribution`,
`Run.top_latents`, `Run.steer`), `load_sae`, the typed results (`EvalResult`,
`AnalysisResult` / `AnalysisSummary`, `read_analysis`) and the settings dataclasses (`Inputs`
bundles a stage's source, data and model settings). Names load on first
use, so `import mlsae` (and `mlsae --help`) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from mlsae.analysis.analyze import AnalysisResult
    from mlsae.analysis.prompt import PromptCodes
    from mlsae.analysis.summary import AnalysisSummary, read_analysis
    from mlsae.api.pipeline import (
        activations,
        analyze,
        evaluate,
        evaluate_lens,
        evolution,
        load_model,
        resume,
        train,
        train_lens,
    )
    from mlsae.api.run import (
        Run,
        Steering,
        TokenProb,
        layer_distribution,
        open_run,
        steer,
        top_latents,
    )
    from mlsae.core.config import (
        DataConfig,
        ExtractConfig,
        ModelConfig,
        SaeGridConfig,
        SourceConfig,
        TrainConfig,
    )
    from mlsae.core.errors import MlsaeError
    from mlsae.core.inputs import Inputs
    from mlsae.core.stage_config import AnalysisConfig, EvalConfig, EvolutionConfig, LensTrainConfig
    from mlsae.eval.result import EvalResult
    from mlsae.sae.autoencoder import SparseAutoencoder

_WHERE = {
    "mlsae.api.pipeline": [
        "activations",
        "analyze",
        "evaluate",
        "evaluate_lens",
        "evolution",
        "load_model",
        "resume",
        "train",
        "train_lens",
    ],
    "mlsae.api.run": [
        "Run",
        "Steering",
        "TokenProb",
        "layer_distribution",
        "open_run",
        "steer",
        "top_latents",
    ],
    "mlsae.analysis.prompt": ["PromptCodes"],
    "mlsae.analysis.analyze": ["AnalysisResult"],
    "mlsae.analysis.summary": ["AnalysisSummary", "read_analysis"],
    "mlsae.eval.result": ["EvalResult"],
    "mlsae.core.config": [
        "DataConfig",
        "ExtractConfig",
        "ModelConfig",
        "SaeGridConfig",
        "SourceConfig",
        "TrainConfig",
    ],
    "mlsae.core.inputs": ["Inputs"],
    "mlsae.core.stage_config": [
        "AnalysisConfig",
        "EvalConfig",
        "EvolutionConfig",
        "LensTrainConfig",
    ],
    "mlsae.core.errors": ["MlsaeError"],
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "AnalysisConfig",
    "AnalysisResult",
    "AnalysisSummary",
    "DataConfig",
    "EvalConfig",
    "EvalResult",
    "EvolutionConfig",
    "ExtractConfig",
    "Inputs",
    "LensTrainConfig",
    "MlsaeError",
    "ModelConfig",
    "PromptCodes",
    "Run",
    "SaeGridConfig",
    "SourceConfig",
    "Steering",
    "TokenProb",
    "TrainConfig",
    "__version__",
    "activations",
    "analyze",
    "evaluate",
    "evaluate_lens",
    "evolution",
    "layer_distribution",
    "load_model",
    "load_sae",
    "open_run",
    "read_analysis",
    "resume",
    "steer",
    "top_latents",
    "train",
    "train_lens",
]


def load_sae(
    path: str | Path, compute_dtype: torch.dtype | None = None, **kw: Any
) -> SparseAutoencoder:
    """Load an SAE: an mlsae SAE or run folder (cfg.json + sae.safetensors), a sparsify, SAELens
    or tim-lawson/mlsae checkpoint folder, or an `org/name` Hugging Face repo of any of these
    (fetched through huggingface_hub when the hub is reachable; its cache otherwise).
    kw: model, layers, for sources that do not record them. See mlsae.interchange.load_any.

    >>> sae = mlsae.load_sae("runs/demo")  # doctest: +SKIP
    """
    from mlsae.interchange.convert import load_any

    return load_any(path, compute_dtype=compute_dtype, **kw)


class _Package(types.ModuleType):
    """The `mlsae` module: three API calls share their names with stage subpackages
    (`mlsae.train`, `mlsae.activations`, `mlsae.evolution`). Importing such a subpackage would
    bind it over the call; it stays reachable by import (`from mlsae.train import loop`) and
    `mlsae.train` stays the call."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _MODULE:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in [n for n in _MODULE if isinstance(globals().get(n), types.ModuleType)]:
    del globals()[_name]  # a subpackage imported before this line (not normally the case)


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562)."""
    if name in _MODULE:
        return getattr(importlib.import_module(_MODULE[name]), name)
    raise AttributeError(f"module 'mlsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
