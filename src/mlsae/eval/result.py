"""The typed result of `mlsae evaluate` (what the stage returns and writes as JSON; the report,
the explorer and the Python API read it). The JSON keeps the keys of older files (`layers`,
`per_layer` {metric: [value per layer]}, `mean`, `dead_fraction`, `n_tokens`, ...), so files
written before still load, and adds `intervals` (the context bootstrap, SPEC 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlsae.activations.norms import NormOutliers
from mlsae.core.bootstrap import BootstrapInfo, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.schema import from_dict, to_dict

METRICS = ("fvu", "mse", "l0", "delta_ce", "kl")
"""The columns every evaluation has."""
OPTIONAL = ("fvu_typical", "fvu_std", "delta_ce_typical", "fvu_model", "mse_model", "lens_cond")
"""Columns some evaluations have: FVU without norm outliers, FVU in the SAE's standardised space,
delta CE with the norm-outlier positions left clean (eval/extras.py), a lens SAE's model-space
FVU / MSE and its lens's cond(I + A_l)."""

Values = list[float | None]


@dataclass
class PerLayer:
    """Per-layer metrics, each a list aligned with `EvalResult.layers` (None: not measured)."""

    fvu: Values | None = None
    mse: Values | None = None
    l0: Values | None = None
    delta_ce: Values | None = None
    kl: Values | None = None
    fvu_typical: Values | None = None
    fvu_model: Values | None = None
    mse_model: Values | None = None
    lens_cond: Values | None = None
    fvu_std: Values | None = None
    delta_ce_typical: Values | None = None

    def columns(self) -> dict[str, Values]:
        """The metrics this evaluation has, in table order (all of METRICS in a file of this
        version; an older or foreign file may lack some)."""
        return {k: getattr(self, k) for k in (*METRICS, *OPTIONAL) if getattr(self, k) is not None}


@dataclass
class MeanRow:
    """Each metric's mean over the layers where it was measured (None: nowhere)."""

    fvu: float | None = None
    mse: float | None = None
    l0: float | None = None
    delta_ce: float | None = None
    kl: float | None = None
    fvu_typical: float | None = None
    fvu_model: float | None = None
    mse_model: float | None = None
    fvu_std: float | None = None
    delta_ce_typical: float | None = None

    def get(self, key: str) -> float | None:
        return getattr(self, key, None)


@dataclass
class MetricIntervals:
    """Bootstrap intervals of one metric: per layer, and of its mean over layers."""

    per_layer: list[Interval | None]
    mean: Interval | None


@dataclass
class EvalIntervals:
    """The context-bootstrap intervals of the headline metrics (SPEC 7)."""

    bootstrap: BootstrapInfo
    fvu: MetricIntervals | None = None
    fvu_typical: MetricIntervals | None = None
    delta_ce: MetricIntervals | None = None
    kl: MetricIntervals | None = None
    fvu_std: MetricIntervals | None = None
    delta_ce_typical: MetricIntervals | None = None

    def get(self, key: str) -> MetricIntervals | None:
        keys = ("fvu", "fvu_typical", "delta_ce", "kl", "fvu_std", "delta_ce_typical")
        return getattr(self, key, None) if key in keys else None


@dataclass
class EvalResult:
    """One SAE evaluated on held-out tokens (SPEC 3)."""

    layers: list[int]
    per_layer: PerLayer
    mean: MeanRow
    dead_fraction: float | None = None
    n_tokens: int = 0
    sae: str = ""
    model: str | None = ""
    """The language model (None, JSON null: none, e.g. a synthetic cache)."""
    space: str = "model"
    """'model', or 'tuned-lens' (then fvu / mse are in lens space, *_model in the model's)."""
    lens: str | None = None
    exclude_sink: bool | None = None
    """Whether attention-sink positions were left out (None: not recorded)."""
    norm_outliers: NormOutliers | None = None
    intervals: EvalIntervals | None = None
    sections: dict[str, object] = field(default_factory=dict)
    """Further measurements, by name, each added by its own function as a JSON-ready object
    (e.g. all blocks replaced at once, SAEBench scores); written under `sections`. A section
    that other code reads back should get its own typed field here instead."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object: older keys as before, absent optional columns left out."""
        out = to_dict(self)
        out["per_layer"] = {k: list(v) for k, v in self.per_layer.columns().items()}
        present = set(out["per_layer"])
        out["mean"] = {k: v for k, v in out["mean"].items() if k in present}
        for key in ("lens", "exclude_sink", "norm_outliers", "intervals"):
            if out[key] is None:
                del out[key]
        if not self.sections:
            del out["sections"]
        return out

    @classmethod
    def from_json(cls, obj: object, where: str = "eval.json") -> EvalResult:
        """Read an `mlsae evaluate` JSON (this version's or an older one)."""
        if not isinstance(obj, dict):
            raise MlsaeError(f"{where}: expected a JSON object")
        return from_dict(cls, obj, where)

    def table(self) -> str:
        """The per-layer text table `mlsae evaluate` prints."""
        return format_eval_table(self)

    def to_pandas(self) -> Any:
        """The per-layer metrics as a pandas DataFrame indexed by layer (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise MlsaeError("to_pandas() needs pandas (pip install pandas)") from None
        return pd.DataFrame(self.per_layer.columns(), index=pd.Index(self.layers, name="layer"))

    def interval(self, key: str, i: int | None = None) -> Interval | None:
        """The interval of metric `key` at layer position i (None: of the mean), if any."""
        mi = self.intervals.get(key) if self.intervals is not None else None
        if mi is None:
            return None
        return mi.mean if i is None else mi.per_layer[i]


Matrix = list[list[float | None]]


@dataclass
class DiagonalPair:
    """A single-layer SAE against the MLSAE on the SAE's own block, over the same held-out
    contexts: the MLSAE / single FVU ratio and the MLSAE - single delta CE, each with a paired
    bootstrap interval (both SAEs' sums resampled with the same draws)."""

    sae: str
    layer: int
    fvu_ratio: float | None
    """MLSAE FVU / single-layer FVU at `layer` (1.1: the MLSAE's FVU is 10% higher)."""
    fvu_ratio_interval: Interval | None
    delta_ce_diff: float | None
    """MLSAE delta CE - single-layer delta CE at `layer` (nats; None without delta CE)."""
    delta_ce_diff_interval: Interval | None


@dataclass
class CrossResult:
    """`mlsae evaluate --cross`: every single-layer SAE on every layer, and the MLSAE (last
    row) on the same layers; each metric a matrix [row][layer] (None: not measured)."""

    rows: list[str]
    row_layers: list[list[int]]
    """The layers each row's SAE was trained on."""
    layers: list[int]
    sae: list[str]
    model: str | None
    n_tokens: int
    dead_fraction: list[float]
    fvu: Matrix
    mse: Matrix
    l0: Matrix
    delta_ce: Matrix
    kl: Matrix
    diagonal: list[DiagonalPair] = field(default_factory=list)
    """Each single-layer SAE vs the MLSAE on its block, paired over contexts (empty with
    --bootstrap 0 and in older files)."""
    bootstrap: BootstrapInfo | None = None

    def matrix(self, key: str) -> Matrix:
        """The matrix of metric `key` (one of METRICS)."""
        if key not in METRICS:
            raise MlsaeError(f"no metric {key!r} in a cross-layer result ({', '.join(METRICS)})")
        return getattr(self, key)

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)


def fmt_value(v: float | None, width: int = 9) -> str:
    """A metric for a text table: 4 decimals, scientific below 1e-3, '-' when not measured."""
    if v is None or math.isnan(v):
        return "-".rjust(width)
    return f"{v:{width}.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:{width}.2e}"


def fmt_interval(iv: Interval | None, width: int = 19) -> str:
    """'[low, high]' with 3 significant digits each, '-' when there is none."""
    if iv is None:
        return "-".rjust(width)
    return f"[{iv.low:.3g}, {iv.high:.3g}]".rjust(width)


_SHORT = {"fvu_typical": "fvu_typ", "delta_ce_typical": "dce_typ"}
"""Column names of the table that are shorter than the JSON keys."""


def format_eval_table(r: EvalResult) -> str:
    """Per-layer table with a mean row (and a 95% interval column after each metric that has
    one), then dead fraction, token count, intervals and outliers. A lens SAE's FVU is in lens
    space; its fvu_model column is the FVU in the model's space."""
    cols = r.per_layer.columns()
    head = "layer"
    for k in cols:
        head += _SHORT.get(k, k).rjust(10)
        if r.interval(k) is not None:
            head += "95% CI".rjust(20)
    rows = [head, "-" * len(head)]

    def cells(i: int | None) -> str:
        out = ""
        for k, v in cols.items():
            out += " " + fmt_value(v[i] if i is not None else r.mean.get(k))
            if r.interval(k) is not None:
                out += " " + fmt_interval(r.interval(k, i))
        return out

    rows += [f"{layer:5d}" + cells(i) for i, layer in enumerate(r.layers)]
    rows.append(" mean" + cells(None))
    dead = "-" if r.dead_fraction is None else f"{r.dead_fraction:.4f}"
    rows.append(f"dead fraction {dead}   tokens {r.n_tokens}")
    if r.intervals is not None:
        b = r.intervals.bootstrap
        rows.append(
            f"95% CI: percentile bootstrap over {b.n_contexts} contexts "
            f"({b.n_resamples} resamples, seed {b.seed})"
        )
    if r.norm_outliers is not None:
        rep = r.norm_outliers
        rows.append(f"outliers: {rep.describe()}")
        if rep.dominated():
            rows.append(
                "  the FVU of those layers mostly measures how well these few vectors are rebuilt"
            )
        if r.per_layer.fvu_typical is not None:
            rows.append(
                f"  fvu_typ: the FVU without the tokens whose vector is above "
                f"{rep.factor:g}x its layer's median norm"
            )
        if r.per_layer.delta_ce_typical is not None:
            rows.append("  dce_typ: delta CE with those positions left clean (not spliced)")
    if r.per_layer.fvu_std is not None:
        where = "the model's space" if r.space == "model" else "lens space (fvu_model: model's)"
        rows.append(f"fvu: in {where}; fvu_std: in the SAE's standardised space (per vector)")
    if r.exclude_sink is False:
        rows.append("attention-sink positions are included (--no-exclude-sink or an older cache)")
    return "\n".join(rows)
