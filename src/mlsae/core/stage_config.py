"""Settings of the later stages, one dataclass each (a docstring per field, validated in
`__post_init__`): evaluation, the tuned lens (`mlsae lens train`) and features across layers
(`mlsae evolution`). The CLI options of those commands are derived from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mlsae.core.config import check

Measure = Literal["pearson", "jaccard", "sufficiency", "necessity", "decoder_cos"]
MEASURES: tuple[Measure, ...] = ("pearson", "jaccard", "sufficiency", "necessity", "decoder_cos")

SUGGESTED_MIN_SINGULAR = 0.9
"""A floor on the singular values of I + A_l after the regression, for users who want the exact
inverse to amplify SAE errors by at most 1 / 0.9 = 1.1x (`lens train --min-singular 0.9`). NOT
the default: the default lens is SPEC 5's (no floor, KL-trained until the held-out KL stops
improving). Measured on SmolLM2 (demo settings, 8 KL steps of one context): the floor doubled
the lens KL at blocks 24 and 28 (1.09 -> 2.05, 0.28 -> 0.61) while the lens MLSAE's model-space
FVU fell from 0.70 to 0.18 and its delta CE from 3.04 to 1.44; more KL steps move the
translators off the floor (0.36-0.71 after 60 steps at a higher lr), so the 1.1x bound holds only
right after the regression. `lens evaluate` and `evaluate` report cond(I + A_l) per layer."""

LENS_LR = 1e-3
"""Adam lr of the KL steps after the regression warm start."""


@dataclass
class EvalConfig:
    """What `mlsae evaluate` measures."""

    ce: bool = True
    """Delta CE and KL by splicing each reconstruction into the model (--no-ce: skip)."""
    allow_train: bool = False
    """Accept training-split tokens (evaluation is meant for held-out ones)."""
    replace: str | None = None
    """Also splice the reconstructions of several blocks in one forward (each replaced as the
    forward reaches it): 'all', '0-k' or a list '0,3,5'; delta CE and KL for every cumulative
    prefix of the set, next to the one-block splices (SPEC 7)."""
    format: Literal["mlsae", "saebench"] = "mlsae"
    """saebench: also SAEBench's core metrics per layer (kl_div_score, ce_loss_score against
    zero ablation, l2_ratio, ...), written beside --out as SAEBench's core result files."""

    def __post_init__(self) -> None:
        check(
            self.format in ("mlsae", "saebench"),
            f"unknown --format {self.format!r}: mlsae or saebench",
        )
        check(
            self.ce or (self.replace is None and self.format == "mlsae"),
            "--replace and --format saebench splice into the model: drop --no-ce",
        )


@dataclass
class BootstrapConfig:
    """Confidence intervals by resampling the evaluated contexts (SPEC 7)."""

    bootstrap: int = 1000
    """Resamples of the percentile bootstrap over contexts behind every interval (0: no
    intervals). Costs memory per context: for `evaluate`, contexts x layers x width floats."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap's resampling."""

    def __post_init__(self) -> None:
        check(self.bootstrap >= 0, "--bootstrap must be >= 0")


@dataclass
class AnalysisConfig:
    """What `mlsae analyze` computes besides the SPEC 4 statistics."""

    paper_batch_tokens: int = 2048
    """Tokens per batch of the paper code's variance ratios, reported beside ours (its 2,048;
    0: not computed)."""

    def __post_init__(self) -> None:
        check(self.paper_batch_tokens >= 0, "--paper-batch-tokens must be >= 0")


@dataclass
class LensTrainConfig:
    """How the tuned lens is fitted (SPEC section 5; `mlsae lens train`)."""

    init: Literal["regression", "zero"] = "regression"
    """'regression': least-squares warm start (Din et al.); 'zero': the identity (A = 0, c = 0)."""
    ridge: float = 0.01
    """Ridge of the regression, as a fraction of the Gram matrix's diagonal."""
    min_singular: float | None = None
    """Floor on the singular values of I + A after the regression (default: no floor, SPEC 5;
    0.9 bounds the exact inverse's gain at 1.1x, at a cost in lens KL)."""
    keep_floor: bool = False
    """Keep --min-singular through the KL steps too: after every optimizer step each
    translator's singular values of I + A below it are raised to it (a projection), so the
    lens stays well conditioned for the exact inverse (default: the floor binds only at the
    regression; the KL steps may then shrink singular values again)."""
    cond_cap: float | None = None
    """Bound cond(I + A) of every translator by this, at the warm start and after every KL
    step (singular values below the largest / this are raised to it). Scale-free, unlike
    --min-singular: the final norm ignores a translator's overall scale, and the warm start's
    largest singular values reach hundreds, so a floor of 0.9 still allows cond ~500
    (default: no bound)."""
    lr: float | None = None
    """Adam lr of the KL steps (default: 1e-3 after the regression and from zero)."""
    steps: int = 120
    """Maximum KL optimizer steps (0: regression only); the lr decays to 0 at this step."""
    step_contexts: int = 1
    """Contexts per KL step."""
    holdout_contexts: int = 4
    """Last training-split contexts held out for early stopping (0: run all --steps)."""
    eval_every: int = 10
    """KL steps between held-out evaluations."""
    patience: int = 3
    """Stop after this many held-out evaluations in a row in which no block improved."""
    seed: int = 0
    """Seed of the data order."""

    def __post_init__(self) -> None:
        check(
            self.init in ("regression", "zero"),
            f"--init must be regression or zero, not {self.init!r}",
        )
        if self.lr is None:
            self.lr = LENS_LR
        check(self.step_contexts >= 1, "--step-contexts must be >= 1")
        check(self.steps >= 0, "--steps must be >= 0")
        check(self.lr > 0, "--lr must be > 0")
        check(self.ridge >= 0, "--ridge must be >= 0")
        check(
            self.min_singular is None or 0 <= self.min_singular < 1,
            "--min-singular must be in [0, 1)",
        )
        check(self.holdout_contexts >= 0, "--holdout-contexts must be >= 0")
        check(self.cond_cap is None or self.cond_cap >= 1, "--cond-cap must be >= 1")
        check(
            not self.keep_floor or bool(self.min_singular),
            "--keep-floor needs a floor: give --min-singular (e.g. 0.9)",
        )
        check(
            self.eval_every >= 1 and self.patience >= 1, "--eval-every and --patience must be >= 1"
        )
        check(
            not (self.init == "zero" and self.steps == 0),
            "--init zero with --steps 0 would save the logit lens: use --steps >= 1",
        )


@dataclass
class EvolutionConfig:
    """Settings of `mlsae evolution` (saved in evolution.json)."""

    top_m: int = 3
    """Edges: each feature's m most similar next/previous-layer partners (0: no top-m cut)."""
    edge_threshold: float | None = None
    """Edges: keep only pairs whose edge measure is >= this (default: no threshold)."""
    edge_measure: Measure = "pearson"
    """Similarity used for edges, partners and community weights."""
    max_edges_per_pair: int = 200_000
    """Cap on edges kept per layer pair in threshold-only mode (largest measure first)."""
    active_fraction: float = 0.2
    """A feature is active on a token when its activation is > this x its max over the data."""
    pass_through: float = 0.95
    """Passed through: best next-layer Pearson >= this."""
    link_threshold: float = 0.5
    """Appears: no previous-layer partner of Pearson >= this; disappears: no next-layer one."""
    boolean_threshold: float = 0.999
    """AND: exactly two up features of necessity >= this; OR: of sufficiency >= this."""
    boolean_exclusive: bool = True
    """AND / OR must combine, not copy: an OR's parents each cover less than
    --boolean-threshold of the child and together at least that (sum of their necessities); an
    AND's parents each imply it on less than that share (sufficiency). --no-boolean-exclusive:
    the bare SPEC rule (a copy of one parent plus any subset feature counts as an OR)."""
    min_support: int = 10
    """Features active on fewer tokens are left out of AND / OR / specialisation (1 = the bare
    SPEC definition; rare features make spurious AND/ORs)."""
    specialise_necessity: float = 0.9
    """Specialises: some up feature i has necessity(i|j) >= this ..."""
    specialise_sufficiency: float = 0.5
    """... and sufficiency(j|i) <= this: j fires on a clear subset of i's tokens."""
    contexts: int = 5
    """Top activating token contexts kept per feature."""
    memory_gb: float = 1.0
    """Budget for the pair co-moment matrices held at once (12 bytes per feature pair)."""
    seed: int = 0
    """Seed of the community detection."""
    resolution: float = 1.0
    """Community resolution (1 = modularity; larger: smaller communities)."""
    community: Literal["auto", "leiden", "louvain"] = "auto"
    """Community detection: auto (Leiden, else Louvain), leiden or louvain."""
    max_nodes_html: int = 1500
    """graph.html draws at most this many nodes (the most connected)."""
    null: bool = True
    """Also run every detector with the down layer's token order permuted (one seeded global
    permutation of the used tokens, --seed): the null model reported beside each rate and count
    (doubles the pair pass)."""
    rescale: bool = True
    """Multiply each latent's activation by its vector's scale (the std of per-vector
    standardisation) before any cross-layer statistic, so the same feature's activations are
    comparable across layers (--no-rescale: the SAEs' own standardised activations, which divide
    by a std that changes from layer to layer with the other features; issue 24, 3d)."""

    def __post_init__(self) -> None:
        check(
            self.top_m > 0 or self.edge_threshold is not None,
            "give --top-m, --edge-threshold or both to define graph edges",
        )
        check(self.top_m >= 0, f"--top-m must be >= 0, not {self.top_m}")
        check(
            self.edge_measure in MEASURES,
            f"unknown --edge-measure {self.edge_measure!r}: one of {MEASURES}",
        )
        check(
            0 < self.active_fraction < 1,
            f"--active-fraction must be in (0, 1), not {self.active_fraction}",
        )
        check(self.memory_gb > 0, f"--memory-gb must be > 0, not {self.memory_gb}")
        check(
            self.contexts >= 0 and self.min_support >= 1 and self.max_nodes_html >= 1,
            "--contexts must be >= 0, --min-support and --max-nodes-html >= 1",
        )
        check(
            self.community in ("auto", "leiden", "louvain"),
            f"unknown --community {self.community!r}: auto, leiden or louvain",
        )


@dataclass
class ExportConfig:
    """How `mlsae export` writes an SAE for other tools."""

    format: Literal["saelens", "hub", "neuronpedia"] = "saelens"
    """saelens: SAELens 6.x folders, one per block hook; hub: a folder ready to upload;
    neuronpedia: Neuronpedia's import layout, one source per block (from the run's explorer
    index: run `mlsae index` first)."""
    approximate: bool = False
    """Export a normalize='standardize' SAE with SAELens's layer_norm mode, whose decode maps back
    with std instead of std + 1e-5 (encode is exact)."""
    hook_format: str | None = None
    """Hook name pattern, e.g. 'model.layers.{layer}' (default: the model's own block names)."""
    repo_id: str = "ORG/NAME"
    """hub: the repo id the model card names."""
    eval_json: Path | None = None
    """hub: an `mlsae evaluate` JSON for the model card (default: the run's)."""
    np_model: str = ""
    """neuronpedia: the model id there (default: from the model's name)."""
    np_set: str = "mlsae-res"
    """neuronpedia: the source set name (sources are '<layer>-<set>')."""
    np_creator: str = "mlsae"
    """neuronpedia: the creator name and id recorded in the rows."""
    np_examples: int = 16
    """neuronpedia: top examples exported per feature and block."""


@dataclass
class ImportConfig:
    """What `mlsae import` reads."""

    format: Literal["auto", "sparsify", "saelens", "mlsae-hub"] = "auto"
    """sparsify, saelens, mlsae-hub (the paper's checkpoints) or auto (detected)."""


@dataclass
class IndexConfig:
    """What `mlsae index` keeps per latent (the explorer's database)."""

    top_n: int = 32
    """Top activating examples kept per latent and layer."""
    window: int = 4
    """Context tokens either side of an example."""
    samples: int = 48
    """Activations sampled per latent for the examples by activation quantile."""
    n_logits: int = 10
    """Top promoted and suppressed tokens kept per latent (logit effects)."""
    n_neighbours: int = 10
    """Nearest latents by decoder cosine kept per latent."""
    seed: int = 0
    """Seed of the activation sampling."""

    def __post_init__(self) -> None:
        check(
            self.top_n >= 1 and self.samples >= 4 and 0 <= self.window <= 32,
            "--top-n must be >= 1, --samples >= 4 and --window in [0, 32]",
        )
        check(
            self.n_logits >= 1 and self.n_neighbours >= 1,
            "--n-logits and --n-neighbours must be >= 1",
        )


@dataclass
class ExploreConfig:
    """How `mlsae explore` serves the explorer."""

    port: int = 8765
    """TCP port (0: any free port)."""
    host: str = "127.0.0.1"
    """Address to bind (default: this machine only)."""
    max_tokens: int = 128
    """Longest prompt the prompt page accepts, in tokens."""
    dense: float = 0.1
    """Latents active on more than this share of indexed tokens are flagged dense (and can be
    hidden) everywhere in the explorer."""

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "--port must be in [0, 65535]")
        check(1 <= self.max_tokens <= 1024, "--max-tokens must be between 1 and 1024")
        check(0.0 < self.dense <= 1.0, "--dense must be in (0, 1]")


@dataclass
class ControlsConfig:
    """Settings of `mlsae controls measures|causal` (controls for the cross-layer measures of
    `mlsae evolution`, issue 24 item 3; saved in their JSON). The measures' own thresholds are
    EvolutionConfig's."""

    pair_layers: str = "3,12,24"
    """Up layers l of the pairs checked: (l, l+1) observed, (l, l + gap) nulls, (l, l) seeds."""
    gaps: list[int] = field(default_factory=lambda: [2, 4, 8])
    """Non-adjacent null: the measures between blocks l and l + gap (gaps past the last SAE
    are skipped)."""
    control_seed: int = 0
    """Seed of the token permutations, the causal check's feature sample and its random
    predecessors, and of the bootstrap."""
    resamples: int = 1000
    """Bootstrap resamples behind every interval (contexts for the measures, tested features
    for the causal rates)."""
    causal_contexts: int = 8
    """Causal check: held-out contexts run through the model (8 x 256 = 2,048 tokens)."""
    causal_features: int = 48
    """Causal check: downstream features tested per pair (a seeded sample of those active on
    >= --min-support of the causal tokens)."""
    drop: float = 0.5
    """Causal check: a removal 'kills' a downstream activation that falls by >= this fraction."""

    def __post_init__(self) -> None:
        check(all(g >= 2 for g in self.gaps), f"--gaps must be >= 2, not {self.gaps}")
        check(self.resamples >= 1, f"--resamples must be >= 1, not {self.resamples}")
        check(
            self.causal_contexts >= 1 and self.causal_features >= 1,
            "--causal-contexts and --causal-features must be >= 1",
        )
        check(0 < self.drop <= 1, f"--drop must be in (0, 1], not {self.drop}")
