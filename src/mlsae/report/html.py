"""report.html of `mlsae analyze`: a plain-language reading of analysis.json against the paper,
tables and figures, in one self-contained file (images as base64 data URIs, no external links
or scripts)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from mlsae.analysis.summary import (
    AnalysisSummary,
    CompareSummary,
    LayerSummary,
)
from mlsae.core.io import write_text
from mlsae.core.schema import to_dict
from mlsae.eval.result import EvalResult, MeanRow
from mlsae.report.tables import cell_html, eval_table, fmt_g, kv_table, lens_table, ratio_table

PAPER_TOKEN_FACTOR = (10.0, 100.0)  # "one to two orders of magnitude smaller"


# ---------------------------------------------------------------- plain-language reading


def reading(s: AnalysisSummary) -> list[str]:
    """A few sentences interpreting the analysis summary against the paper."""
    out = [
        f"{s.n_tokens} tokens (special tokens excluded) on layers {s.layers[0]}.."
        f"{s.layers[-1]}; {s.n_latents_alive} of {s.n_latents} latents were active at "
        f"least once ({s.n_latents_dead} never active, excluded)."
    ]
    if (t := _token_reading(s)) is not None:
        out.append(t)
    if (pr := paper_reading(s)) is not None:
        out.append(pr)
    if (rl := s.rel_var_latent) is not None:
        out.append(
            f"Aggregated over tokens, a latent's layer variance is {fmt_g(rl)} of the total layer "
            f"variance (rel_var_latent): "
            + (
                "individual latents spread over many layers (more than half the total spread)."
                if rl > 0.5
                else "individual latents are concentrated on a few neighbouring layers."
            )
        )
    if (m := _multi_layer_reading(s)) is not None:
        out.append(m)
    out += _geometry_reading(s)
    for c in s.compare:
        if c.rel_var_token is None:
            continue
        if c.space != s.space:
            out.append(lens_reading(s, c))
            continue
        layers = c.sae_cfg.layers if c.sae_cfg is not None else "?"
        out.append(
            f"The comparison SAE ({c.label or c.sae}, trained on layers {layers})"
            f" applied to the same layers gives rel_var_latent = {fmt_g(c.rel_var_latent)} "
            f"and rel_var_token = {fmt_g(c.rel_var_token)}."
        )
    if s.eval_mean is not None:
        out.append(
            f"Reconstruction (mean over layers): FVU {fmt_g(s.eval_mean.fvu)}, delta CE "
            f"{fmt_g(s.eval_mean.delta_ce)} (paper, Pythia-70m with R=64, k=32: 0.097 and 0.565)."
        )
    return out


def _token_reading(s: AnalysisSummary) -> str | None:
    """How much smaller a latent's layer variance is for one token, against the paper."""
    fac = s.token_variance_factor
    if fac is None:
        if s.rel_var_token == 0:
            return "For a single token every latent is active at exactly one layer."
        return None
    lo, hi = PAPER_TOKEN_FACTOR
    verdict = (
        "in the range the paper reports (one to two orders of magnitude)"
        if lo <= fac <= hi
        else "even more than the one to two orders of magnitude the paper reports"
        if fac > hi
        else "less than the one to two orders of magnitude the paper reports"
    )
    return (
        f"For a single token, a latent's layer variance is {fac:.1f}x smaller than across "
        f"tokens (rel_var_token = {fmt_g(s.rel_var_token)}): {verdict}."
    )


def _multi_layer_reading(s: AnalysisSummary) -> str | None:
    ma, mt = s.multi_layer_fraction_aggregate, s.multi_layer_fraction_token
    if ma is None or mt is None:
        return None
    verdict = (
        "as in the paper: multi-layer in aggregate, mostly single-layer for one token."
        if mt < 0.5 <= ma
        else "unlike the paper, most activations of a latent on one token span several layers."
        if mt >= 0.5
        else "few latents are multi-layer even in aggregate."
    )
    return (
        f"{100 * ma:.1f}% of active latents fire at more than one layer somewhere in the "
        f"sample, and {100 * mt:.1f}% of (token, latent) activations span more than one "
        f"layer of the same token: {verdict}"
    )


def _geometry_reading(s: AnalysisSummary) -> list[str]:
    """Residual norms over depth and adjacent-layer cosines (empty without geometry)."""
    out = []
    nm = [v for v in (s.norm_mean or []) if v is not None]
    if len(nm) > 1:
        steps = np.diff(np.asarray(nm, dtype=float))
        grows = nm[-1] > nm[0] and (steps > 0).mean() >= 0.5
        out.append(
            f"Mean residual norm goes from {fmt_g(nm[0])} (block {s.layers[0]}) to {fmt_g(nm[-1])} "
            f"(block {s.layers[-1]}), rising at {int((steps > 0).sum())} of {len(steps)} "
            "steps: "
            + (
                "norms grow with depth, as the paper reports."
                if grows
                else "norms do not grow steadily with depth, unlike the paper."
            )
        )
    cos = [c for c in (s.adjacent_cosine or []) if c is not None]
    if cos:
        out.append(
            f"Adjacent-layer cosine similarity of centred residual vectors ranges from "
            f"{min(cos):.3f} to {max(cos):.3f} (mean {float(np.mean(cos)):.3f})."
        )
    return out


def paper_reading(s: LayerSummary) -> str | None:
    """The paper code's ratios beside ours, and why they differ (SPEC 4)."""
    pf = s.paper_formula
    if pf is None or pf.rel_var_token is None:
        return None
    return (
        f"The paper's code computes these ratios with another formula and gets "
        f"rel_var_token = {fmt_g(pf.rel_var_token)} (single-token variance "
        f"{fmt_g(pf.token_variance_factor)}x smaller; ours: {fmt_g(s.token_variance_factor)}x) and "
        f"rel_var_latent = {fmt_g(pf.rel_var_latent)} (ours {fmt_g(s.rel_var_latent)}), over "
        f"{pf.n_batches} batch(es) of {pf.batch_tokens} tokens. The gap is the formula, not the "
        "data. It averages over all (token, latent) pairs, of which only "
        f"{_pct(pf.active_pair_fraction)} are active (the inactive ones count as "
        "variance 0), weighting every pair and every latent equally; and it applies "
        "sum_l l^2 q - (sum_l l q)^2 to a latent's token-averaged distribution q, which sums "
        "to the latent's active fraction f instead of 1. For such q the expression is "
        "f Var(L) + f (1 - f) E[L]^2: mostly the squared mean layer position (0..L-1), which "
        "measures how deep a latent sits rather than how widely it spreads, while the "
        "per-token term is f times a true variance. Normalising each latent's q before taking "
        "its variance gives rel_var_token = "
        f"{fmt_g(pf.rel_var_token_normalised)}; the rest of the gap to ours is the "
        "weighting (ours weights by activation mass, so the ratios are variances of one joint "
        "law, each in [0, 1]). The paper also keeps special tokens (inputs zeroed) in its "
        "batches; we exclude them."
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2g}%"


_MULTI = (
    "rel_var_latent",
    "rel_var_token",
    "multi_layer_fraction_token",
    "multi_layer_fraction_aggregate",
)


def lens_reading(s: AnalysisSummary, c: CompareSummary) -> str:
    """One sentence comparing the same kind of SAE with and without the tuned lens (SPEC 5)."""
    lensed, plain = (s, c) if s.space == "tuned-lens" else (c, s)
    parts = [f"{k} {fmt_g(getattr(lensed, k))} vs {fmt_g(getattr(plain, k))}" for k in _MULTI]
    a, b = lensed.multi_layer_fraction_token, plain.multi_layer_fraction_token
    verdict = ""
    if a is not None and b is not None:
        verdict = (
            ": the lens increases per-token multi-layer activity, as the paper reports (slightly)."
            if a > b
            else ": the lens does not increase per-token multi-layer activity here, unlike the paper."
        )
    out = "With the tuned lens vs without (" + "; ".join(parts) + ")" + verdict
    el, ep = lensed.eval_mean or MeanRow(), plain.eval_mean or MeanRow()
    fl = el.fvu_model if el.fvu_model is not None else el.fvu
    if fl is not None and ep.fvu is not None:
        out += (
            f" In the model's space (through the exact inverse) the lens SAE's held-out FVU is "
            f"{fmt_g(fl)} vs {fmt_g(ep.fvu)} and its delta CE {fmt_g(el.delta_ce)} vs "
            f"{fmt_g(ep.delta_ce)} (lens-space FVU {fmt_g(el.fvu)})."
        )
    return out


# ---------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:right;font-size:13px}th{background:#f0f0f0}td.k{text-align:left}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;
font-size:14px}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}
.reading li{margin:.3em 0}"""


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_report(
    path: Path,
    s: AnalysisSummary,
    figs: list[tuple[str, Path]],
    configs: dict[str, dict[str, object]],
    ev: tuple[Path, EvalResult] | None,
    extra_sections: list[str] | None = None,
) -> Path:
    """Write the self-contained report.html atomically."""
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>mlsae analysis: {html.escape(Path(s.run).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Where latents live: {html.escape(s.run)}</h1>",
        f"<p>SAE <code>{html.escape(s.sae)}</code>; data {cell_html(to_dict(s.data))}.</p>",
        "<h2>Reading</h2><ul class=reading>",
        *[f"<li>{html.escape(t)}</li>" for t in reading(s)],
        "</ul><h2>Layer statistics</h2>",
        ratio_table(s),
    ]
    if s.prompts:
        parts.append(
            "<p>Prompts: "
            + "; ".join(f"{i + 1}: <q>{html.escape(p.text)}</q>" for i, p in enumerate(s.prompts))
            + "</p>"
        )
    parts.append("<h2>Figures</h2>")
    for cap, p in figs:
        parts.append(f"<figure>{_img(p)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    if (le := s.lens_eval) is not None:
        parts += [
            "<h2>Tuned lens</h2>",
            f"<p>Lens <code>{html.escape(le.path)}</code>: KL(final || lens) and "
            "next-token CE per block on held-out tokens (nats). Lens-space SAEs see T_l(x); "
            "their reconstructions return through the exact inverse, so delta CE and KL are "
            "measured in the model's space, and eval: fvu_model is the FVU there.</p>",
            lens_table(le.result),
        ]
    if ev is not None:
        parts += [
            f"<h2>Evaluation <small>({html.escape(ev[0].name)})</small></h2>",
            eval_table(ev[1]),
        ]
    else:
        parts.append(
            "<h2>Evaluation</h2><p>No evaluation JSON in the run folder "
            "(run <code>mlsae evaluate</code> to add one).</p>"
        )
    parts += list(extra_sections or [])
    parts.append("<h2>Configuration</h2>")
    for name, cfg in configs.items():
        parts += [f"<h3>{html.escape(name)}</h3>", kv_table(cfg)]
    parts.append(
        "<h2>Definitions</h2><p>L is the block index. P(L=l|J=j) = sum_t a[t,l,j] / "
        "sum_t,l' a[t,l',j]; P(J=j) and P(T=t,J=j) are proportional to the latent's total "
        "activation (over layers and tokens, resp. over layers). rel_var_latent = "
        "E_J[Var(L|J)]/Var(L); rel_var_token = E_J,T[Var(L|J,T)]/E_J[Var(L|J)]. "
        "multi_layer_fraction_aggregate: fraction of active latents with activity at more "
        "than one layer over the sample; multi_layer_fraction_token: fraction of active "
        "(token, latent) pairs active at more than one layer of that token. Special tokens "
        "are excluded; never-active latents are excluded where undefined. Rows 'paper code:' "
        "are the ratios as the paper's code computes them (analysis.json paper_formula): per "
        "batch of batch_tokens used tokens, p = a / sum over layers (0 where inactive), "
        "unweighted means of sum_l l^2 p - (sum_l l p)^2 over all tokens and latents and over "
        "the token-mean p, with l = 0..L-1; ratios averaged over batches.</p></body></html>"
    )
    return write_text(path, "\n".join(parts))
