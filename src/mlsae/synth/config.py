"""Settings of `mlsae synth generate` and `mlsae synth score` (one dataclass each; the CLI
options derive from the fields, their docstrings are the options' help)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlsae.core.config import check


@dataclass
class SynthConfig:
    """What `mlsae synth generate` makes (saved in truth.json)."""

    n_layers: int = 8
    """Layers (blocks 0..n_layers-1) of every token."""
    d_model: int = 64
    """Width of the vectors."""
    n_features: int = 64
    """True features in all (roots and relation children); at most --d-model unless
    --superposition."""
    superposition: bool = False
    """Random unit directions (they overlap) instead of an orthonormal set; allows
    --n-features above --d-model."""
    tokens: int = 20_000
    """Training-split tokens (the train/ cache)."""
    test_tokens: int = 4096
    """Held-out tokens (the test/ cache: same features, other tokens)."""
    context_length: int = 64
    """Tokens per context."""
    drift_deg: float = 0.0
    """Angle in degrees between a feature's directions at adjacent layers (exact for every
    feature: the whole dictionary rotates by it in d/2 planes; 0 = the same direction at every
    layer; needs an even --d-model when not 0)."""
    min_span: int = 1
    """Shortest span (layers from a feature's first to its last) of a root feature."""
    max_span: int = 0
    """Longest span of a root feature (0: --n-layers)."""
    firing_max: float = 0.2
    """Firing probability of the most frequent root feature."""
    firing_exponent: float = 0.7
    """Heavy tail: the r-th most frequent root feature fires with firing_max * r^-exponent."""
    magnitude_min: float = 0.5
    """Smallest activation magnitude (uniform between min and max, one draw per token and
    feature, the same at every layer of the feature's span)."""
    magnitude_max: float = 1.5
    """Largest activation magnitude."""
    schedule_sd: float = 0.0
    """Per-layer magnitude schedule: each feature's magnitude at a layer is multiplied by
    exp(a random walk of this step sd) along its span (0: flat)."""
    norm_growth: float = 1.0
    """The stream's norm at the last layer over the first (geometric in between; SmolLM2: 19)."""
    layer_activity: float = 1.0
    """Probability that a feature firing on a token is active at every layer of its span on
    that token; otherwise at one layer of the span, uniform (1: per-token = aggregated)."""
    n_and: int = 2
    """AND children: a feature that starts at layer l+1 and fires iff both parents (ending at
    l) fired on the token."""
    n_or: int = 2
    """OR children: fire iff either parent fired."""
    n_specialised: int = 2
    """Specialised children: fire on a random subset of their parent's tokens."""
    specialise_fraction: float = 0.3
    """Fraction of the parent's tokens a specialised child fires on."""
    parent_firing: float = 0.1
    """Firing probability of the parents of AND / OR / specialised children."""
    noise: float = 0.0
    """Dense Gaussian noise: per-dimension sd added to every vector (before the norm growth)."""
    outlier_fraction: float = 0.0
    """Sink-like outliers: fraction of tokens whose vectors (every layer) get a large component
    along one fixed direction, 10-100x the layer's median norm."""
    seed: int = 0
    """Seed of everything (features, tokens): the same settings give the same bytes."""
    storage_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the caches."""

    def __post_init__(self) -> None:
        check(self.n_layers >= 2, f"--n-layers must be >= 2, not {self.n_layers}")
        check(self.d_model >= 2, f"--d-model must be >= 2, not {self.d_model}")
        check(self.n_features >= 1, f"--n-features must be >= 1, not {self.n_features}")
        check(
            self.superposition or self.n_features <= self.d_model,
            f"--n-features {self.n_features} > --d-model {self.d_model}: give --superposition",
        )
        check(
            self.tokens >= self.context_length and self.test_tokens >= self.context_length,
            "--tokens and --test-tokens must be at least --context-length",
        )
        check(self.context_length >= 1, "--context-length must be >= 1")
        check(0 <= self.drift_deg <= 180, f"--drift-deg must be in [0, 180], not {self.drift_deg}")
        check(self.drift_deg == 0 or self.d_model % 2 == 0, "--drift-deg needs an even --d-model")
        span = self.max_span or self.n_layers
        check(
            1 <= self.min_span <= span <= self.n_layers,
            f"need 1 <= --min-span <= --max-span <= --n-layers ({self.n_layers})",
        )
        check(
            0 < self.firing_max <= 1 and 0 < self.parent_firing <= 1,
            "--firing-max and --parent-firing must be in (0, 1]",
        )
        check(self.firing_exponent >= 0, "--firing-exponent must be >= 0")
        check(
            0 < self.magnitude_min <= self.magnitude_max,
            "need 0 < --magnitude-min <= --magnitude-max",
        )
        check(self.schedule_sd >= 0 and self.noise >= 0, "--schedule-sd, --noise must be >= 0")
        check(self.norm_growth > 0, f"--norm-growth must be > 0, not {self.norm_growth}")
        check(0 <= self.layer_activity <= 1, "--layer-activity must be in [0, 1]")
        check(min(self.n_and, self.n_or, self.n_specialised) >= 0, "relation counts must be >= 0")
        need = 3 * (self.n_and + self.n_or) + 2 * self.n_specialised
        check(
            need <= self.n_features,
            f"{need} features are relation parents and children, "
            f"more than --n-features {self.n_features}",
        )
        check(0 < self.specialise_fraction < 1, "--specialise-fraction must be in (0, 1)")
        check(0 <= self.outlier_fraction < 1, "--outlier-fraction must be in [0, 1)")


@dataclass
class ScoreConfig:
    """How `mlsae synth score` matches learned latents to true features."""

    recovered_cos: float = 0.9
    """A true feature is recovered when some decoder row has |cosine| >= this with it."""
    span_share: float = 0.05
    """A matched MLSAE latent 'covers' a layer when P(L=l | J=j) >= this (its measured span)."""

    def __post_init__(self) -> None:
        check(0 < self.recovered_cos <= 1, "--recovered-cos must be in (0, 1]")
        check(0 < self.span_share < 1, "--span-share must be in (0, 1)")
