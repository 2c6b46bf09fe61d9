"""The typed summary of `mlsae analyze` (what the stage returns and writes as analysis.json; the
report and the Python API read it). analysis.json is its serialisation, one flat object as
before: one SAE's layer statistics (SPEC 4) at the top level beside the residual geometry and
the provenance, each prompt and `--compare` SAE its own statistics object, so files written by
older versions still read (`AnalysisSummary.from_json`, every field type-checked).

Undefined numbers (a ratio with a zero denominator) are None here, null in the JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from mlsae.analysis.contexts import AnalysisIntervals
from mlsae.analysis.geometry import GeometryResult
from mlsae.analysis.layers import LayerStatsResult
from mlsae.analysis.paper_variance import PaperFormula
from mlsae.core.config import SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import json_safe, read_json
from mlsae.core.schema import from_dict, to_dict
from mlsae.eval.result import MeanRow
from mlsae.lens.evaluate import LensEvalResult
from mlsae.sae.crosscoder import LayerShareSummary

Number = float | None
"""A finite number, or None where it is undefined."""
S = TypeVar("S", bound="LayerSummary")
"""`LayerSummary` or a subclass (`LayerSummary.of` builds either)."""


def number(x: float | None) -> Number:
    """x as a float, None when it is missing or not finite."""
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class LayerSummary:
    """One SAE's layer statistics over one sample (SPEC 4): the scalars and short lists of
    `LayerStatsResult` (its per-latent arrays go to latents.npz)."""

    layers: list[int]
    """Block index of each layer column."""
    n_tokens: int
    n_latents: int
    n_latents_alive: int
    n_latents_dead: int
    var_layer: Number
    """Var(L)."""
    mean_var_latent: Number
    """E_J[Var(L|J)]."""
    mean_var_token: Number
    """E_J,T[Var(L|J,T)]."""
    rel_var_latent: Number
    rel_var_token: Number
    multi_layer_fraction_aggregate: Number
    multi_layer_fraction_token: Number
    multi_layer_fraction_token_per_latent: Number
    p_layer: list[Number]
    """P(L=l) per layer."""
    active_layers_hist: list[int]
    """(token, latent) pairs active at exactly m layers, m = 0..L."""
    active_pair_fraction: Number = None
    paper_formula: PaperFormula | None = None
    intervals: AnalysisIntervals | None = None
    """The context bootstrap's 95% intervals (SPEC 7), when it was run."""
    token_variance_factor: Number = None
    """1 / rel_var_token (None when it is 0 or undefined)."""

    @classmethod
    def of(cls: type[S], stats: LayerStatsResult, **extra: Any) -> S:
        """The summary of finished statistics (NaN as None), as `cls` with its own fields
        `extra` (e.g. `PromptSummary.of(stats, text=...)`)."""
        pf = stats.paper_formula
        r = number(stats.rel_var_token)
        return cls(
            layers=list(stats.layers),
            n_tokens=stats.n_tokens,
            n_latents=stats.n_latents,
            n_latents_alive=stats.n_latents_alive,
            n_latents_dead=stats.n_latents_dead,
            var_layer=number(stats.var_layer),
            mean_var_latent=number(stats.mean_var_latent),
            mean_var_token=number(stats.mean_var_token),
            rel_var_latent=number(stats.rel_var_latent),
            rel_var_token=r,
            multi_layer_fraction_aggregate=number(stats.multi_layer_fraction_aggregate),
            multi_layer_fraction_token=number(stats.multi_layer_fraction_token),
            multi_layer_fraction_token_per_latent=number(
                stats.multi_layer_fraction_token_per_latent
            ),
            p_layer=[number(float(p)) for p in stats.p_layer],
            active_layers_hist=[int(h) for h in stats.active_layers_hist],
            active_pair_fraction=number(stats.active_pair_fraction),
            paper_formula=None
            if pf is None
            else from_dict(PaperFormula, json_safe(to_dict(pf)), "paper formula"),
            intervals=stats.intervals,
            token_variance_factor=1.0 / r if r is not None and r > 0 else None,
            **extra,
        )


@dataclass
class PromptSummary(LayerSummary):
    """The layer statistics of one `--prompt`'s tokens."""

    text: str = ""

    @staticmethod
    def of_prompt(text: str, stats: LayerStatsResult) -> PromptSummary:
        return PromptSummary.of(stats, text=text)


@dataclass
class CompareSummary(LayerSummary):
    """A `--compare` SAE applied to the same tokens and layers as the main one."""

    sae: str = ""
    """Its SAE folder."""
    label: str = ""
    space: str = "model"
    """'model', or 'tuned-lens' (it sees the lens's T_l(x))."""
    sae_cfg: SaeConfig | None = None
    eval_mean: MeanRow | None = None
    """The mean row of its run's `mlsae evaluate` output, if it has one."""


@dataclass
class DataInfo:
    """Where the analysed activations came from."""

    model: str | None = None
    dataset: str | None = None
    split: str | None = None
    lens: str | None = None


@dataclass
class LensEval:
    """The `mlsae lens evaluate` output found in a lens folder the SAEs use."""

    path: str
    result: LensEvalResult


_GEOMETRY = (
    "adjacent_pairs",
    "adjacent_cosine",
    "adjacent_cosine_raw",
    "norm_mean",
    "norm_std",
    "norm_min",
    "norm_max",
    "norm_quantiles",
)


@dataclass
class AnalysisSummary(LayerSummary):
    """analysis.json: the main SAE's layer statistics (the inherited fields), the residual
    geometry of the analysed vectors, the prompts, the `--compare` SAEs and the provenance."""

    adjacent_pairs: list[list[int]] | None = None
    adjacent_cosine: list[Number] | None = None
    """Mean cosine of centred residual vectors of adjacent blocks (None: no geometry)."""
    adjacent_cosine_raw: list[Number] | None = None
    norm_mean: list[Number] | None = None
    norm_std: list[Number] | None = None
    norm_min: list[Number] | None = None
    norm_max: list[Number] | None = None
    norm_quantiles: dict[str, list[Number]] | None = None
    """Quantile ('0.05', ...) -> residual norm per layer."""
    run: str = ""
    sae: str = ""
    space: str = "model"
    cache: str | None = None
    data: DataInfo = field(default_factory=DataInfo)
    sae_cfg: SaeConfig | None = None
    prompts: list[PromptSummary] = field(default_factory=list)
    compare: list[CompareSummary] = field(default_factory=list)
    eval_mean: MeanRow | None = None
    """The mean row of the run's `mlsae evaluate` output, if it has one."""
    lens_eval: LensEval | None = None
    layer_share: LayerShareSummary | None = None
    """A crosscoder's decoder-norm share over the layers (absent for the other SAEs)."""
    figures: list[str] = field(default_factory=list)
    """The PNG files the report stage drew (empty before it ran)."""

    def set_geometry(self, geo: GeometryResult) -> None:
        """Take the residual geometry's numbers (NaN as None)."""
        layers = geo.layers
        self.adjacent_pairs = [[a, b] for a, b in zip(layers[:-1], layers[1:], strict=True)]
        self.adjacent_cosine = [number(c) for c in geo.adjacent_cosine]
        self.adjacent_cosine_raw = [number(c) for c in geo.adjacent_cosine_raw]
        self.norm_mean = [number(v) for v in geo.norm_mean]
        self.norm_std = [number(v) for v in geo.norm_std]
        self.norm_min = [number(v) for v in geo.norm_min]
        self.norm_max = [number(v) for v in geo.norm_max]
        self.norm_quantiles = {q: [number(v) for v in vs] for q, vs in geo.norm_quantiles.items()}

    def to_json(self) -> dict[str, object]:
        """analysis.json's object (the keys of older files; no geometry keys without it)."""
        out: dict[str, Any] = json_safe(to_dict(self))
        if self.norm_mean is None:
            for k in _GEOMETRY:
                del out[k]
        if self.layer_share is None:
            del out["layer_share"]
        for row, obj in zip(out["compare"], self.compare, strict=True):
            _layer_json(row, obj)
        _layer_json(out, self)
        return out

    def table(self) -> str:
        """The headline numbers of the SAE, the `--compare` SAEs and the prompts as text."""
        return summary_table(self)

    def to_pandas(self) -> Any:
        """The headline numbers as a pandas DataFrame (quantity x summary); needs pandas."""
        return summary_frame(self)

    @classmethod
    def from_json(cls, obj: object, where: str = "analysis.json") -> AnalysisSummary:
        """Read an analysis.json (this version's or an older one), every field checked."""
        if not isinstance(obj, dict):
            raise MlsaeError(f"{where}: expected a JSON object")
        obj = dict(obj)
        if isinstance(le := obj.get("lens_eval"), dict):
            obj["lens_eval"] = {"path": le.get("path"), "result": le}
        summary = from_dict(cls, obj, where)
        _check_quantiles(summary.norm_quantiles, where)
        return summary


def _layer_json(out: dict[str, Any], obj: AnalysisSummary | CompareSummary) -> None:
    """Write a summary's nested objects as older files did: the evaluation's mean row without
    unmeasured metrics, the lens evaluation flat beside its path, `sae_cfg` with d_sae."""
    if obj.eval_mean is not None:
        out["eval_mean"] = {k: v for k, v in to_dict(obj.eval_mean).items() if v is not None}
    if obj.sae_cfg is not None:
        out["sae_cfg"] = obj.sae_cfg.to_dict()
    if isinstance(obj, AnalysisSummary) and obj.lens_eval is not None:
        out["lens_eval"] = {"path": obj.lens_eval.path, **obj.lens_eval.result.to_json()}


def _check_quantiles(q: object, where: str) -> None:
    if q is None:
        return
    ok = isinstance(q, dict) and all(
        isinstance(v, list) and all(x is None or isinstance(x, (int, float)) for x in v)
        for v in q.values()
    )
    if not ok:
        raise MlsaeError(f"{where}: norm_quantiles: expected lists of numbers")


def read_analysis(path: Path) -> AnalysisSummary:
    """The analysis.json at `path` (or in the folder `path`), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "analysis.json"
    return AnalysisSummary.from_json(read_json(path, "analysis summary"), str(path))


HEADLINE = (
    "n_tokens",
    "n_latents",
    "n_latents_alive",
    "var_layer",
    "mean_var_latent",
    "mean_var_token",
    "rel_var_latent",
    "rel_var_token",
    "token_variance_factor",
    "multi_layer_fraction_aggregate",
    "multi_layer_fraction_token",
    "multi_layer_fraction_token_per_latent",
    "active_pair_fraction",
)
"""The quantities of a `LayerSummary` the tables show, in order."""


def columns(s: AnalysisSummary) -> list[tuple[str, LayerSummary]]:
    """The summaries a table sets side by side: the SAE, each `--compare` SAE, each prompt."""
    return [
        ("this SAE", s),
        *((f"compare: {c.label}", c) for c in s.compare),
        *((f"prompt {i + 1}", p) for i, p in enumerate(s.prompts)),
    ]


def _cell(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_table(s: AnalysisSummary) -> str:
    """The headline quantities of the SAE, the comparison SAEs and the prompts as text."""
    cols = columns(s)
    rows = [["quantity", *(name for name, _ in cols)]]
    rows += [[k, *(_cell(getattr(d, k)) for _, d in cols)] for k in HEADLINE]
    ivs = [getattr(d, "intervals", None) for _, d in cols]  # prompts have none
    for f in fields(AnalysisIntervals):
        cells = [getattr(iv, f.name) if iv is not None else None for iv in ivs]
        if f.type.startswith("Interval") and any(c is not None for c in cells):
            text = ["-" if c is None else f"[{c.low:.4g}, {c.high:.4g}]" for c in cells]
            rows.append([f"95% CI: {f.name}", *text])
    if any(iv is not None for iv in ivs):
        n = [str(iv.bootstrap.n_contexts) if iv is not None else "-" for iv in ivs]
        rows.append(["bootstrap contexts (percentile)", *n])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(lines)


def summary_frame(s: AnalysisSummary) -> Any:
    """The headline quantities as a pandas DataFrame (quantity x summary); needs pandas."""
    try:
        import pandas as pd
    except ImportError:
        raise MlsaeError("to_pandas() needs pandas (pip install pandas)") from None
    cols = columns(s)
    return pd.DataFrame(
        {name: [getattr(d, k) for k in HEADLINE] for name, d in cols}, index=list(HEADLINE)
    )
