"""The typed outputs of `mlsae evolution`: `EvolutionSummary` (DIR/evolution.json) and
`GraphFile` (DIR/graph.json). The JSON files are their serialisation, with the keys of older
outputs, so those still read. `load_evolution(DIR)` is the one validated reader the report and
the explorer use: every key's type (core.schema), finiteness, and the ranges a reader relies on
(layers increasing, each pair joining adjacent layers, feature indices inside the SAE, edge
endpoints inside the node list, fractions and thresholds in [0, 1]); any fault is one
`MlsaeError` line naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from mlsae.core.bootstrap import BootstrapInfo, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json_object
from mlsae.core.schema import from_dict, to_dict
from mlsae.core.stage_config import EvolutionConfig
from mlsae.evolution.graphfile import GraphFile

THRESHOLDS = (
    "pass_through",
    "link_threshold",
    "boolean_threshold",
    "specialise_necessity",
    "specialise_sufficiency",
    "active_fraction",
)
"""The settings that are thresholds on measures in [0, 1]."""
RATES = ("pass_through", "appear", "disappear", "and_rate", "or_rate", "specialised")
"""The per-pair rates that get a null model and an interval over contexts."""
OLDER = {"null": False, "boolean_exclusive": False}
"""What an evolution.json written before these settings existed did."""


def fmt_interval(iv: Interval | None, width: int = 17) -> str:
    """'[low, high]' with 3 significant digits, '-' without an interval."""
    return ("-" if iv is None else f"[{iv.low:.3g}, {iv.high:.3g}]").rjust(width)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise MlsaeError(msg)


def _check_intervals(
    intervals: dict[str, Interval | None], keys: Sequence[str], where: str
) -> None:
    """Every interval under a known key, and read back as an `Interval` (core.schema leaves
    dict values as JSON): replaced in place."""
    for k, iv in intervals.items():
        _check(k in keys, f"{where}: unknown key {k!r}")
        if isinstance(iv, dict):
            iv = from_dict(Interval, iv, f"{where}: {k}")
            intervals[k] = iv
        _check(iv is None or isinstance(iv, Interval), f"{where}: {k}: not an interval")


def _fraction(name: str, v: float | None) -> None:
    _check(v is None or 0.0 <= v <= 1.0, f"{name}: {v} is not a fraction in [0, 1]")


def _counts(name: str, obj: object) -> None:
    """A JSON object of non-negative integers (dict fields are not checked by core.schema)."""
    _check(isinstance(obj, dict), f"{name}: expected an object")
    for k, v in obj.items():  # type: ignore[union-attr]
        _check(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            f"{name}: {k}: expected a count, got {v!r:.40}",
        )


@dataclass
class NullRates:
    """The same detectors with the down layer's token order permuted (issue 24, 3b): what the
    rates are when the relation between the two layers is destroyed."""

    permutation: str
    """How the down layer's tokens were permuted ('global': one permutation of all used
    tokens; seeded)."""
    seed: int
    pass_through: float | None = None
    appear: float | None = None
    disappear: float | None = None
    n_and: int = 0
    n_or: int = 0
    n_specialised: int = 0

    def __post_init__(self) -> None:
        for k in ("pass_through", "appear", "disappear"):
            _fraction(k, getattr(self, k))
        _check(min(self.n_and, self.n_or, self.n_specialised) >= 0, "negative null count")


@dataclass
class PairSummary:
    """One adjacent pair (up layer, down layer): fractions over alive features (None when a
    layer has none), counts, and the AND / OR / specialised features found."""

    up_layer: int
    down_layer: int
    alive_up: int
    dead_up: int
    alive_down: int
    dead_down: int
    pass_through: float | None
    disappear: float | None
    appear: float | None
    n_and: int
    n_or: int
    n_specialised: int
    specialised: float | None
    n_edges: int
    and_features: list[tuple[int, int, int]] = field(default_factory=list)
    """(down feature, up feature 1, up feature 2)."""
    or_features: list[tuple[int, int, int]] = field(default_factory=list)
    specialised_features: list[tuple[int, int]] = field(default_factory=list)
    """(down feature, its parent up feature)."""
    n_supported_up: int | None = None
    """Alive up features active (> the 'active' threshold) on >= min_support tokens."""
    n_supported_down: int | None = None
    null: NullRates | None = None
    intervals: dict[str, Interval | None] = field(default_factory=dict)
    """Bootstrap interval over contexts of each rate of RATES (empty without --bootstrap)."""

    def __post_init__(self) -> None:
        # up == down: the seed ceiling of `mlsae controls` (two SAEs of one block)
        _check(0 <= self.up_layer <= self.down_layer, f"pair {self.up_layer}->{self.down_layer}")
        counts = (self.alive_up, self.dead_up, self.alive_down, self.dead_down, self.n_edges)
        _check(min(counts) >= 0, "negative feature or edge count")
        for k in ("pass_through", "disappear", "appear", "specialised"):
            _fraction(k, getattr(self, k))
        d_up, d_dn = self.alive_up + self.dead_up, self.alive_down + self.dead_down
        for name, rows, n in (
            ("and_features", self.and_features, self.n_and),
            ("or_features", self.or_features, self.n_or),
            ("specialised_features", self.specialised_features, self.n_specialised),
        ):
            _check(len(rows) == n, f"{name}: {len(rows)} rows for a count of {n}")
            for r in rows:
                ok = 0 <= r[0] < d_dn and all(0 <= i < d_up for i in r[1:])
                _check(ok, f"{name}: {list(r)} outside the SAEs' {d_up} / {d_dn} features")
        _check_intervals(self.intervals, RATES, "intervals")

    @property
    def and_rate(self) -> float | None:
        return self.n_and / self.alive_down if self.alive_down else None

    @property
    def or_rate(self) -> float | None:
        return self.n_or / self.alive_down if self.alive_down else None


@dataclass
class Findings:
    """The seed's three findings, each with the numbers it rests on."""

    pass_through_mean: float
    pass_through_holds: bool
    n_and: int
    n_or: int
    boolean_fraction: float
    boolean_holds: bool
    n_specialised: int
    specialised_fraction: float
    specialise_holds: bool
    intervals: dict[str, Interval | None] = field(default_factory=dict)
    """Bootstrap interval over contexts of pass_through_mean, boolean_fraction and
    specialised_fraction (empty without --bootstrap, and in older files)."""

    def __post_init__(self) -> None:
        keys = ("pass_through_mean", "boolean_fraction", "specialised_fraction")
        for k in keys:
            _fraction(k, getattr(self, k))
        _check(min(self.n_and, self.n_or, self.n_specialised) >= 0, "negative count")
        _check_intervals(self.intervals, keys, "findings: intervals")


@dataclass
class MatchRow:
    """SAE Match between one adjacent pair: the FVU of each variant against x_(l+1)."""

    up_layer: int
    down_layer: int
    matched: float | None = None
    matched_target_scale: float | None = None
    unpermuted: float | None = None
    own: float | None = None
    identity_fraction: float | None = None

    def __post_init__(self) -> None:
        _fraction("identity_fraction", self.identity_fraction)
        for k in ("matched", "matched_target_scale", "unpermuted", "own"):
            v = getattr(self, k)
            _check(v is None or v >= 0, f"{k}: an FVU cannot be negative ({v})")


@dataclass
class CommunitySummary:
    """Count and sizes of the graph's communities (singletons: features left alone)."""

    method: str = ""
    n_communities: int = 0
    n_singletons: int = 0
    sizes: list[int] = field(default_factory=list)
    size_histogram: dict[str, int] = field(default_factory=dict)
    largest: int = 0
    median_size: float | None = None
    mean_layer_span: float | None = None
    max_layer_span: int = 0

    def __post_init__(self) -> None:
        _counts("size_histogram", self.size_histogram)
        _check(len(self.sizes) == self.n_communities, "sizes: one per community")
        _check(all(s >= 2 for s in self.sizes), "sizes: a community has >= 2 features")


@dataclass
class GraphCounts:
    nodes: int
    edges: int
    html_nodes_drawn: int = 0


@dataclass
class DataFacts:
    """Where the tokens came from."""

    n_tokens: int
    context_length: int
    source: str = ""
    model: str | None = None
    lens: str | None = None

    def __post_init__(self) -> None:
        _check(self.n_tokens >= 0 and self.context_length >= 1, "data: token counts")


@dataclass
class EvolutionSummary:
    """DIR/evolution.json: settings, per-pair results, SAE Match, communities, findings."""

    run: str
    layers: list[int]
    data: DataFacts
    n_used_tokens: int
    settings: EvolutionConfig
    dead: dict[str, int]
    pairs: list[PairSummary]
    match: list[MatchRow]
    communities: CommunitySummary
    graph: GraphCounts
    findings: Findings
    time_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    figures: dict[str, str] = field(default_factory=dict)
    bootstrap: BootstrapInfo | None = None
    """How the rates' intervals were made (None: no intervals)."""

    def __post_init__(self) -> None:
        ly = self.layers
        _check(
            len(ly) >= 2 and ly[0] >= 0 and all(a < b for a, b in pairwise(ly)),
            f"layers: {ly!r:.60} are not >= 2 increasing block numbers",
        )
        for k in THRESHOLDS:
            _fraction(f"settings: {k}", getattr(self.settings, k))
        _check(self.n_used_tokens >= 0, "n_used_tokens: negative")
        _counts("dead", self.dead)
        _check(set(self.dead) <= {str(x) for x in ly}, "dead: a layer that is not in layers")
        adjacent = list(pairwise(ly))
        for name, rows in (("pairs", self.pairs), ("match", self.match)):
            got = [(r.up_layer, r.down_layer) for r in rows]
            _check(got == adjacent, f"{name}: the pairs {got!r:.60} are not the adjacent layers")
        for k, v in self.phase_s.items():
            _check(isinstance(v, (int, float)) and math.isfinite(v), f"phase_s: {k}: {v!r:.30}")
        for k, v in self.figures.items():
            _check(
                isinstance(v, str) and "/" not in v and v not in ("", ".", ".."),
                f"figures: {k}: {v!r:.40} is not a file name",
            )

    def to_json(self) -> dict[str, Any]:
        out = to_dict(self)
        if self.bootstrap is None:
            del out["bootstrap"]
        for p in out["pairs"]:
            for k in ("n_supported_up", "n_supported_down", "null"):
                if p[k] is None:
                    del p[k]
            if not p["intervals"]:
                del p["intervals"]
        if not out["findings"]["intervals"]:
            del out["findings"]["intervals"]
        return out

    @classmethod
    def from_json(cls, obj: object, where: str = "evolution.json") -> EvolutionSummary:
        """Read an evolution.json; an older file's settings lack the newer switches and get
        the behaviour it was made with (no null model, the bare SPEC AND / OR rule)."""
        if isinstance(obj, dict) and isinstance(obj.get("settings"), dict):
            obj = {**obj, "settings": {**OLDER, **obj["settings"]}}
        return from_dict(cls, obj, where)


@dataclass
class EvolutionOutput:
    """An `mlsae evolution` folder, read and checked."""

    folder: Path
    summary: EvolutionSummary
    graph: GraphFile | None = None


def load_evolution(folder: Path, with_graph: bool = False) -> EvolutionOutput:
    """Read DIR/evolution.json (and DIR/graph.json) with every check; MlsaeError otherwise."""
    folder = Path(folder)
    names = ("graph.json", "evolution.json") if with_graph else ("evolution.json",)
    for name in names:
        if not (folder / name).is_file():
            raise MlsaeError(f"{folder} has no {name}: give an `mlsae evolution` output folder")
    path = folder / "evolution.json"
    summary = EvolutionSummary.from_json(read_json_object(path, "evolution output"), str(path))
    graph = None
    if with_graph:
        gpath = folder / "graph.json"
        graph = GraphFile.from_json(read_json_object(gpath, "feature graph"), str(gpath))
        _check(
            graph.layers == summary.layers,
            f"{gpath}: layers {graph.layers} differ from evolution.json's",
        )
    return EvolutionOutput(folder, summary, graph)
