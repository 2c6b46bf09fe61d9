"""Figures and the report section of `mlsae evolution` (matplotlib Agg; PNGs written
atomically). `evolution_section_html(dir)` returns an HTML <section> for report.html: the
plain-language reading of whether the seed's three findings hold, with the figures inlined."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402  # noqa: E402

from mlsae.core.io import save_figure  # noqa: E402
from mlsae.evolution.summary import (  # noqa: E402
    RATES,
    EvolutionSummary,
    PairSummary,
    fmt_interval,
    load_evolution,
)
from mlsae.evolution.table import thresholds_line  # noqa: E402

FIGURES = {
    "fractions": "evolution_fractions.png",
    "communities": "evolution_communities.png",
    "match": "evolution_match_fvu.png",
}


def _save(fig: Figure, path: Path) -> str:
    return save_figure(fig, path).name


def write_figures(out: Path, body: EvolutionSummary) -> dict[str, str]:
    """The three PNGs of an evolution summary; returns {figure: file name}."""
    out = Path(out)
    pairs, match = body.pairs, body.match
    x = [s.down_layer for s in pairs]
    val = lambda rows, k: [np.nan if getattr(r, k) is None else getattr(r, k) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for key, label in (
        ("pass_through", "passed through (best next Pearson >= %.2f)"),
        ("appear", "appear (no predecessor >= %.2f)"),
        ("disappear", "disappear (no successor >= %.2f)"),
    ):
        thr = getattr(body.settings, "pass_through" if key == "pass_through" else "link_threshold")
        ax.plot(x, val(pairs, key), marker="o", ms=3, label=label % thr)
    ax.set_xlabel("layer l+1 of the pair (l, l+1)")
    ax.set_ylabel("fraction of alive features")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Features across adjacent layers")
    files = {"fractions": _save(fig, out / FIGURES["fractions"])}

    sizes = np.asarray(body.communities.sizes, dtype=int)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    if len(sizes):
        bins = np.unique(np.geomspace(2, sizes.max() + 1, 25).astype(int))
        ax.hist(sizes, bins=bins.tolist() if len(bins) > 1 else 1, color="#1f77b4")
        ax.set_xscale("log")
    ax.set_xlabel("community size (features)")
    ax.set_ylabel("communities")
    c = body.communities
    ax.set_title(f"{c.n_communities} communities ({c.method}), {c.n_singletons} singletons")
    files["communities"] = _save(fig, out / FIGURES["communities"])

    fig, ax = plt.subplots(figsize=(7, 3.4))
    for key, label in (
        ("matched", "SAE Match: decode$_{l+1}$(P encode$_l$(x$_l$))"),
        ("matched_target_scale", "SAE Match, x$_{l+1}$'s mean/std"),
        ("unpermuted", "unpermuted: decode$_{l+1}$(encode$_l$(x$_l$))"),
        ("own", "own SAE at l+1"),
    ):
        ax.plot(x, val(match, key), marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer l+1")
    ax.set_ylabel("FVU against x$_{l+1}$")
    ax.legend(fontsize=8)
    ax.set_title("SAE Match by layer")
    files["match"] = _save(fig, out / FIGURES["match"])
    return files


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def reading(body: EvolutionSummary) -> list[str]:
    """Plain-language sentences: does each of the seed's three findings hold here?"""
    f, s, pairs = body.findings, body.settings, body.pairs
    pt = [p.pass_through for p in pairs if p.pass_through is not None]
    yes = lambda b: "holds" if b else "does not hold"
    iv = lambda k: (  # noqa: E731
        f" [{_pct(i.low)}, {_pct(i.high)}]" if (i := f.intervals.get(k)) is not None else ""
    )
    many = yes(f.pass_through_holds)
    if (i := f.intervals.get("pass_through_mean")) is not None:  # the verdict by its interval
        many = "holds" if i.low >= 0.10 else "does not hold" if i.high < 0.10 else "inconclusive"
    out = [
        f"Many features pass through: {many} here. On average "
        f"{_pct(f.pass_through_mean)}{iv('pass_through_mean')} of a layer's alive features "
        f"have a next-layer feature with Pearson correlation >= {s.pass_through} (range "
        f"{_pct(min(pt, default=None))} to {_pct(max(pt, default=None))} over {len(pairs)} "
        f"layer pairs; 'many' is read as >= 10%, judged by the interval when there is one).",
        f"Some features are quasi-boolean combinations: {yes(f.boolean_holds)} here. "
        f"{f.n_and} AND features (exactly two previous-layer features with necessity >= "
        f"{s.boolean_threshold}) and {f.n_or} OR features (exactly two with sufficiency "
        f">= {s.boolean_threshold}), {_pct(f.boolean_fraction)}{iv('boolean_fraction')} of "
        f"alive features (features active on fewer than {s.min_support} tokens left out)"
        f"{_null_total(pairs, ('n_and', 'n_or'))}.",
        f"Some features specialise later: {yes(f.specialise_holds)} here. "
        f"{f.n_specialised} features ({_pct(f.specialised_fraction)}"
        f"{iv('specialised_fraction')}) fire almost only "
        f"inside one previous-layer feature (necessity >= {s.specialise_necessity}) on at "
        f"most {_pct(s.specialise_sufficiency)} of its active tokens"
        f"{_null_total(pairs, ('n_specialised',))}.",
    ]
    m = [
        (r.matched, r.unpermuted, r.own)
        for r in body.match
        if r.matched is not None and r.unpermuted is not None
    ]
    if m:
        mm = float(np.mean([a for a, _, _ in m]))
        mu = float(np.mean([b for _, b, _ in m]))
        mo = float(np.mean([c for _, _, c in m if c is not None]))
        out.append(
            f"SAE Match: carrying layer l's code to layer l+1 through the matched permutation "
            f"gives a mean FVU of {mm:.3f} against x_(l+1), versus {mu:.3f} without the "
            f"permutation and {mo:.3f} for layer l+1's own SAE."
            + (
                " An FVU of 1 or more means the matched features do not carry over: adjacent "
                "SAEs' decoder directions are unrelated (as for briefly trained SAEs)."
                if mm >= 1
                else ""
            )
        )
    return out


def pair_table_html(body: EvolutionSummary) -> str:
    """Per layer pair: each rate with its interval over contexts and the null model's value."""
    head = ["pair", "alive up / down", *RATES]
    rows = []
    for p in body.pairs:
        cells = [f"{p.up_layer}&rarr;{p.down_layer}", f"{p.alive_up} / {p.alive_down}"]
        for k in RATES:
            v = getattr(p, k)
            text = "-" if v is None else f"{v:.3f}"
            nv = _null_value(p, k)
            if nv is not None:
                text += f" (null {nv:.3f})"
            iv = p.intervals.get(k)
            if iv is not None:
                text += f" {fmt_interval(iv, 0)}"
            cells.append(html.escape(text).replace("&amp;rarr;", "&rarr;"))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    b = body.bootstrap
    note = (
        f"Intervals: 95% bootstrap over {b.n_contexts} contexts ({b.n_resamples} resamples), "
        f"symmetric about the rate and reaching both percentiles (a threshold count's "
        f"resamples sit above it), each feature's partners fixed by the full data."
        if b
        else "No intervals (run with --bootstrap > 0)."
    )
    note += (
        " Null: the same detectors with the down layer's tokens permuted (one global "
        f"permutation, seed {body.settings.seed})."
    )
    return (
        f"<p>{html.escape(note)}</p><table><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def _null_total(pairs: list[PairSummary], keys: tuple[str, ...]) -> str:
    """'; N with the down layer's tokens permuted (null model)', or '' without a null."""
    nulls = [p.null for p in pairs if p.null is not None]
    if not nulls:
        return ""
    n = sum(int(getattr(nl, k)) for nl in nulls for k in keys)
    return f"; {n} with the down layer's tokens permuted (null model)"


def _null_value(p: PairSummary, key: str) -> float | None:
    n = p.null
    if n is None or not p.alive_down:
        return None
    counts = {"and_rate": n.n_and, "or_rate": n.n_or, "specialised": n.n_specialised}
    if key in counts:
        return counts[key] / p.alive_down
    return getattr(n, key)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def evolution_section_html(dir: Path, graph_href: str | None = None) -> str:
    """An HTML <section> for report.html from DIR/evolution.json (read and checked by
    `load_evolution`) and DIR's PNGs. graph_href: the link to DIR/graph.html as seen from the
    report (default: its absolute file URI)."""
    d = Path(dir)
    body = load_evolution(d).summary
    href = graph_href or (d / "graph.html").resolve().as_uri()
    c = body.communities
    parts = [
        '<section id="evolution"><h2>Features across layers (per-layer SAEs)</h2>',
        f"<p>{len(body.layers)} per-layer SAEs, {body.n_used_tokens} used tokens; "
        f"{c.n_communities} communities ({html.escape(c.method)})"
        f" of median size {c.median_size}, largest {c.largest}. "
        f'<a href="{html.escape(href)}">Interactive feature graph</a>.</p><ul>',
    ]
    parts += [f"<li>{html.escape(t)}</li>" for t in reading(body)]
    parts.append(f"<li>{html.escape(thresholds_line(body.settings))}.</li></ul>")
    parts.append(pair_table_html(body))
    for name in body.figures.values():
        if (d / name).is_file():
            parts.append(_img(d / name))
    parts.append("</section>")
    return "\n".join(parts)
