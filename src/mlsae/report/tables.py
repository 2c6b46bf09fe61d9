"""The HTML tables of report.html: the evaluation's per-layer metrics, the variance ratios and
the tuned lens's KL, each interval beside its number (html.py assembles the page)."""

from __future__ import annotations

import html
import json
import math
from typing import Any

from mlsae.analysis.summary import (
    HEADLINE,
    AnalysisSummary,
    CompareSummary,
    LayerSummary,
    columns,
)
from mlsae.core.bootstrap import Interval
from mlsae.eval.result import EvalResult, MeanRow
from mlsae.lens.evaluate import LensEvalResult


def fmt_g(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}g}"


def cell_html(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt_g(v, 4)
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def kv_table(d: dict[str, object]) -> str:
    rows = "".join(
        f"<tr><td class=k>{html.escape(str(k))}</td><td class=k>{cell_html(v)}</td></tr>"
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell_html(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _interval(iv: Interval | None) -> str:
    """'[low, high]' of an interval, else '-'."""
    return "-" if iv is None else f"[{fmt_g(iv.low, 3)}, {fmt_g(iv.high, 3)}]"


def eval_table(ev: EvalResult) -> str:
    """The evaluation's per-layer metrics and means, each metric that has a bootstrap interval
    followed by its 95% interval column."""
    cols = ev.per_layer.columns()
    header: list[str] = ["layer"]
    for k in cols:
        header += [k, f"{k} 95% CI"] if ev.interval(k) is not None else [k]

    def row(label: Any, i: int | None) -> list[Any]:
        out = [label]
        for k, v in cols.items():
            out.append(v[i] if i is not None else ev.mean.get(k))
            if ev.interval(k) is not None:
                out.append(_interval(ev.interval(k, i)))
        return out

    rows = [row(layer, i) for i, layer in enumerate(ev.layers)] + [row("mean", None)]
    note = ""
    if ev.intervals is not None:
        b = ev.intervals.bootstrap
        note = (
            f"<p>95% intervals: percentile bootstrap over the {b.n_contexts} evaluated "
            f"contexts ({b.n_resamples} resamples, seed {b.seed}; SPEC 7).</p>"
        )
    return _grid(header, rows) + note


_INTERVAL_KEYS = (
    "rel_var_latent",
    "rel_var_token",
    "multi_layer_fraction_aggregate",
    "multi_layer_fraction_token",
    "multi_layer_fraction_token_per_latent",
    "paper_rel_var_latent",
    "paper_rel_var_token",
)
_PAPER_KEYS = (
    "rel_var_latent",
    "rel_var_token",
    "token_variance_factor",
    "active_pair_fraction",
    "batch_tokens",
    "n_batches",
)
_EVAL_KEYS = ("fvu", "fvu_model", "mse", "delta_ce", "kl", "l0")  # held-out, from eval.json


def _optional_rows(name: str, vals: list[Any], empty: Any = None) -> list[list[Any]]:
    """[[name, *vals]] if any value is not `empty`, else no row."""
    return [[name, *vals]] if any(v != empty for v in vals) else []


def _eval_mean(d: LayerSummary) -> MeanRow | None:
    return d.eval_mean if isinstance(d, (AnalysisSummary, CompareSummary)) else None


def ratio_table(s: AnalysisSummary) -> str:
    lens = any(c.space != s.space for c in s.compare)
    tag = (lambda space: f" ({space} space)") if lens else (lambda space: "")
    cols = columns(s)
    names = [
        f"this SAE{tag(s.space)}",
        *(f"compare: {c.label}{tag(c.space)}" for c in s.compare),
        *(name for name, _ in cols[1 + len(s.compare) :]),
    ]
    sums = [d for _, d in cols]
    rows = [[k, *(getattr(d, k) for d in sums)] for k in HEADLINE]
    for k in _PAPER_KEYS:  # the paper code's formula (SPEC 4), beside ours
        vals = [None if d.paper_formula is None else getattr(d.paper_formula, k) for d in sums]
        rows += _optional_rows(f"paper code: {k}", vals)
    for k in _INTERVAL_KEYS:  # the context bootstrap (SPEC 7), where it was run
        vals = [_interval(None if d.intervals is None else getattr(d.intervals, k)) for d in sums]
        name = f"95% CI: paper code: {k[6:]}" if k.startswith("paper_") else f"95% CI: {k}"
        rows += _optional_rows(name, vals, "-")
    boots = [None if d.intervals is None else d.intervals.bootstrap for d in sums]
    rows += _optional_rows("bootstrap contexts", [b and b.n_contexts for b in boots])
    for k in _EVAL_KEYS:
        rows += _optional_rows(f"eval: {k}", [(_eval_mean(d) or MeanRow()).get(k) for d in sums])
    return _grid(["quantity", *names], rows)


def lens_table(lens_eval: LensEvalResult) -> str:
    """Per-layer KL and CE of the tuned lens vs the logit lens (`mlsae lens evaluate`), with
    the KL's 95% intervals over contexts and a mean row when it has them."""
    t, lg, cond, iv = lens_eval.tuned, lens_eval.logit, lens_eval.cond, lens_eval.intervals
    rows = [
        [layer, t.kl[i], lg.kl[i], t.ce[i], lg.ce[i], cond[i] if i < len(cond) else None]
        + ([_interval(iv.kl_tuned[i]), _interval(iv.kl_logit[i])] if iv else [])
        for i, layer in enumerate(lens_eval.layers)
    ]
    head = ["layer", "KL tuned", "KL logit", "CE tuned", "CE logit", "cond(I+A)"]
    if iv is not None:
        head += ["KL tuned 95% CI", "KL logit 95% CI"]
    if lens_eval.mean_kl_tuned is not None and lens_eval.mean_kl_logit is not None:
        mean = [lens_eval.mean_kl_tuned, lens_eval.mean_kl_logit]  # over the trained layers
        rows.append(["mean (trained layers)", *mean, None, None, None])
        if iv is not None:
            rows[-1] += [_interval(iv.mean_tuned), _interval(iv.mean_logit)]
    return _grid(head, rows)
