"""The activation cache's manifest.json as a type-checked schema (read through
`mlsae.core.schema.from_dict`): every field a reader relies on is checked, with messages naming
the file and field, before a shard is opened."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mlsae.core.config import check

FORMAT = "mlsae-activation-cache"
SHARD_NAME = re.compile(r"^shard_\d{5}\.safetensors$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


@dataclass
class ShardEntry:
    """One shard file of the cache."""

    name: str
    """File name inside the cache folder (shard_00000.safetensors, ...)."""
    sha256: str
    """Hex sha256 of the file."""
    n_tokens: int
    """Tokens in the shard."""
    n_used: int | None = None
    """Tokens with mask == True (None: count them from the mask)."""
    n_nonfinite: int = 0
    """Tokens whose vectors held NaN or inf when written: stored as zeros, masked out."""

    def __post_init__(self) -> None:
        check(
            SHARD_NAME.match(self.name) is not None,
            f"shard name {self.name!r} is not shard_NNNNN.safetensors",
        )
        check(SHA256.match(self.sha256) is not None, f"{self.name}: sha256 is not 64 hex digits")
        check(self.n_tokens >= 1, f"{self.name}: n_tokens must be >= 1, not {self.n_tokens}")
        check(
            self.n_used is None or 0 <= self.n_used <= self.n_tokens,
            f"{self.name}: n_used {self.n_used} is not in 0..n_tokens ({self.n_tokens})",
        )
        check(
            0 <= self.n_nonfinite <= self.n_tokens,
            f"{self.name}: n_nonfinite {self.n_nonfinite} is not in 0..n_tokens",
        )

    def to_json(self) -> dict[str, str | int]:
        """The manifest's entry (`n_used` when known, `n_nonfinite` when not 0)."""
        out: dict[str, str | int] = {
            "name": self.name,
            "sha256": self.sha256,
            "n_tokens": self.n_tokens,
        }
        if self.n_used is not None:
            out["n_used"] = self.n_used
        if self.n_nonfinite:
            out["n_nonfinite"] = self.n_nonfinite
        return out


@dataclass
class Manifest:
    """manifest.json: what the cache holds and where it came from (unknown keys are kept in the
    dict a cache exposes as `info`, and ignored here)."""

    layers: list[int]
    """Block indices of the stored layers, in storage order."""
    d_model: int
    """Width of the vectors."""
    dtype: Literal["bfloat16", "float32"]
    """Storage dtype of the vectors."""
    n_tokens: int
    """Tokens in all shards."""
    shards: list[ShardEntry]
    """The shard files, in stream order."""
    complete: bool
    """False while `mlsae cache` is still writing (or was interrupted)."""
    model: str | None = None
    """Model the activations came from."""
    dataset: str | None = None
    """Dataset the tokens came from."""
    split: str | None = None
    """Split of the dataset (train / test)."""
    context_length: int | None = None
    """Tokens per context (None: not recorded)."""
    lens: str | None = None
    """Tuned lens the vectors went through (None: the model's space)."""
    format: str = FORMAT
    """Always mlsae-activation-cache."""
    version: int = 1
    """Format version."""
    n_nonfinite: int = 0
    """Tokens left out because a vector held NaN or inf (sum over shards)."""
    special_ids: list[int] = field(default_factory=list)
    """Token ids excluded from the mask (special tokens)."""

    def __post_init__(self) -> None:
        check(self.format == FORMAT, f"format is {self.format!r}, not {FORMAT!r}")
        check(self.version == 1, f"format version {self.version} is not supported (1)")
        check(bool(self.layers), "layers is empty")
        check(
            len(set(self.layers)) == len(self.layers) and min(self.layers) >= 0,
            f"layers {self.layers} must be distinct block indices >= 0",
        )
        check(self.d_model >= 1, f"d_model must be >= 1, not {self.d_model}")
        check(
            self.context_length is None or self.context_length >= 1,
            f"context_length must be >= 1, not {self.context_length}",
        )
        names = [s.name for s in self.shards]
        check(
            names == [shard_name(i) for i in range(len(names))],
            "shards must be shard_00000.safetensors, shard_00001..., in order",
        )
        total = sum(s.n_tokens for s in self.shards)
        check(
            total == self.n_tokens, f"shard sizes add up to {total}, not n_tokens {self.n_tokens}"
        )
        check(self.n_tokens >= 1 or not self.complete, "a complete cache holds no tokens")


def fingerprint(manifest: dict[str, Any]) -> str:
    """A hex digest of what a cache holds (layers, width, dtype, lens and every shard's sha256):
    equal for two caches exactly when their vectors are the same."""
    key = {k: manifest.get(k) for k in ("layers", "d_model", "dtype", "lens")}
    key["shards"] = [(s["name"], s["sha256"], s["n_tokens"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
