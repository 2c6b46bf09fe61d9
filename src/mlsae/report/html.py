"""report.html of `mlsae analyze`: a plain-language reading of analysis.json against the paper,
tables and figures, in one self-contained file (images as base64 data URIs, no external links
or scripts)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.core.bootstrap import Interval
from mlsae.core.io import write_text
from mlsae.eval.result import EvalResult

PAPER_TOKEN_FACTOR = (10.0, 100.0)  # "one to two orders of magnitude smaller"


# ---------------------------------------------------------------- plain-language reading


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}g}"


def reading(s: dict[str, Any], eval_mean: dict[str, Any] | None = None) -> list[str]:
    """A few sentences interpreting analysis.json (`s`) against the paper."""
    out = [
        f"{s['n_tokens']} tokens (special tokens excluded) on layers {s['layers'][0]}.."
        f"{s['layers'][-1]}; {s['n_latents_alive']} of {s['n_latents']} latents were active at "
        f"least once ({s['n_latents_dead']} never active, excluded)."
    ]
    fac, rl = s.get("token_variance_factor"), s.get("rel_var_latent")
    if fac is not None:
        lo, hi = PAPER_TOKEN_FACTOR
        verdict = (
            "in the range the paper reports (one to two orders of magnitude)"
            if lo <= fac <= hi
            else "even more than the one to two orders of magnitude the paper reports"
            if fac > hi
            else "less than the one to two orders of magnitude the paper reports"
        )
        out.append(
            f"For a single token, a latent's layer variance is {fac:.1f}x smaller than across "
            f"tokens (rel_var_token = {_f(s['rel_var_token'])}): {verdict}."
        )
    elif s.get("rel_var_token") == 0:
        out.append("For a single token every latent is active at exactly one layer.")
    if (pr := paper_reading(s)) is not None:
        out.append(pr)
    if rl is not None:
        out.append(
            f"Aggregated over tokens, a latent's layer variance is {_f(rl)} of the total layer "
            f"variance (rel_var_latent): "
            + (
                "individual latents spread over many layers (more than half the total spread)."
                if rl > 0.5
                else "individual latents are concentrated on a few neighbouring layers."
            )
        )
    ma, mt = s.get("multi_layer_fraction_aggregate"), s.get("multi_layer_fraction_token")
    if ma is not None and mt is not None:
        verdict = (
            "as in the paper: multi-layer in aggregate, mostly single-layer for one token."
            if mt < 0.5 <= ma
            else "unlike the paper, most activations of a latent on one token span several layers."
            if mt >= 0.5
            else "few latents are multi-layer even in aggregate."
        )
        out.append(
            f"{100 * ma:.1f}% of active latents fire at more than one layer somewhere in the "
            f"sample, and {100 * mt:.1f}% of (token, latent) activations span more than one "
            f"layer of the same token: {verdict}"
        )
    nm = s.get("norm_mean")
    if nm and len(nm) > 1:
        steps = np.diff(np.asarray(nm, dtype=float))
        grows = nm[-1] > nm[0] and (steps > 0).mean() >= 0.5
        out.append(
            f"Mean residual norm goes from {_f(nm[0])} (block {s['layers'][0]}) to {_f(nm[-1])} "
            f"(block {s['layers'][-1]}), rising at {int((steps > 0).sum())} of {len(steps)} "
            "steps: " + ("norms grow with depth, as the paper reports." if grows
                         else "norms do not grow steadily with depth, unlike the paper.")
        )  # fmt: skip
    cos = [c for c in (s.get("adjacent_cosine") or []) if c is not None]
    if cos:
        out.append(
            f"Adjacent-layer cosine similarity of centred residual vectors ranges from "
            f"{min(cos):.3f} to {max(cos):.3f} (mean {float(np.mean(cos)):.3f})."
        )
    for c in s.get("compare") or []:
        if c.get("rel_var_token") is None:
            continue
        if c.get("space", "model") != s.get("space", "model"):
            out.append(lens_reading(s, c))
            continue
        out.append(
            f"The comparison SAE ({c.get('label', c['sae'])}, trained on layers {c['sae_cfg']['layers']})"
            f" applied to the same layers gives rel_var_latent = {_f(c.get('rel_var_latent'))} "
            f"and rel_var_token = {_f(c.get('rel_var_token'))}."
        )
    if eval_mean:
        fvu, dce = eval_mean.get("fvu"), eval_mean.get("delta_ce")
        out.append(
            f"Reconstruction (mean over layers): FVU {_f(fvu)}, delta CE {_f(dce)} "
            "(paper, Pythia-70m with R=64, k=32: 0.097 and 0.565)."
        )
    return out


def paper_reading(s: dict[str, Any]) -> str | None:
    """The paper code's ratios beside ours, and why they differ (SPEC 4)."""
    pf = s.get("paper_formula")
    if not isinstance(pf, dict) or pf.get("rel_var_token") is None:
        return None
    fac, ours = pf.get("token_variance_factor"), s.get("token_variance_factor")
    return (
        f"The paper's code computes these ratios with another formula and gets "
        f"rel_var_token = {_f(pf['rel_var_token'])} (single-token variance {_f(fac)}x smaller; "
        f"ours: {_f(ours)}x) and rel_var_latent = {_f(pf.get('rel_var_latent'))} (ours "
        f"{_f(s.get('rel_var_latent'))}), over {pf.get('n_batches')} batch(es) of "
        f"{pf.get('batch_tokens')} tokens. The gap is the formula, not the data. It averages "
        "over all (token, latent) pairs, of which only "
        f"{_pct(pf.get('active_pair_fraction'))} are active (the inactive ones count as "
        "variance 0), weighting every pair and every latent equally; and it applies "
        "sum_l l^2 q - (sum_l l q)^2 to a latent's token-averaged distribution q, which sums "
        "to the latent's active fraction f instead of 1. For such q the expression is "
        "f Var(L) + f (1 - f) E[L]^2: mostly the squared mean layer position (0..L-1), which "
        "measures how deep a latent sits rather than how widely it spreads, while the "
        "per-token term is f times a true variance. Normalising each latent's q before taking "
        "its variance gives rel_var_token = "
        f"{_f(pf.get('rel_var_token_normalised'))}; the rest of the gap to ours is the "
        "weighting (ours weights by activation mass, so the ratios are variances of one joint "
        "law, each in [0, 1]). The paper also keeps special tokens (inputs zeroed) in its "
        "batches; we exclude them."
    )


def _pct(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{100 * x:.2g}%"


def lens_reading(s: dict[str, Any], c: dict[str, Any]) -> str:
    """One sentence comparing the same kind of SAE with and without the tuned lens (SPEC 5)."""
    lensed, plain = (s, c) if s.get("space") == "tuned-lens" else (c, s)
    keys = ("rel_var_latent", "rel_var_token", "multi_layer_fraction_token",
            "multi_layer_fraction_aggregate")  # fmt: skip
    parts = [f"{k} {_f(lensed.get(k))} vs {_f(plain.get(k))}" for k in keys]
    a, b = lensed.get("multi_layer_fraction_token"), plain.get("multi_layer_fraction_token")
    verdict = ""
    if a is not None and b is not None:
        verdict = (
            ": the lens increases per-token multi-layer activity, as the paper reports (slightly)."
            if a > b
            else ": the lens does not increase per-token multi-layer activity here, unlike the paper."
        )
    out = "With the tuned lens vs without (" + "; ".join(parts) + ")" + verdict
    el, ep = lensed.get("eval_mean") or {}, plain.get("eval_mean") or {}
    fl, fp = el.get("fvu_model", el.get("fvu")), ep.get("fvu")
    if fl is not None and fp is not None:
        out += (
            f" In the model's space (through the exact inverse) the lens SAE's held-out FVU is "
            f"{_f(fl)} vs {_f(fp)} and its delta CE {_f(el.get('delta_ce'))} vs "
            f"{_f(ep.get('delta_ce'))} (lens-space FVU {_f(el.get('fvu'))})."
        )
    return out


# ---------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:right;font-size:13px}th{background:#f0f0f0}td.k{text-align:left}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;
font-size:14px}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}
.reading li{margin:.3em 0}"""


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return _f(v, 4)
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td class=k>{html.escape(str(k))}</td><td class=k>{_cell(v)}</td></tr>"
                   for k, v in d.items())  # fmt: skip
    return f"<table>{rows}</table>"


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _interval(iv: Interval | None) -> str:
    return "-" if iv is None else f"[{_f(iv.low, 3)}, {_f(iv.high, 3)}]"


def eval_table(ev: EvalResult | dict[str, Any]) -> str:
    """The evaluation's per-layer metrics and means, each metric that has a bootstrap interval
    followed by its 95% interval column."""
    if isinstance(ev, dict):  # a per_layer list of rows (older files): shown as it is
        return _rows_table(ev)
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
        note = (f"<p>95% intervals: percentile bootstrap over the {b.n_contexts} evaluated "
                f"contexts ({b.n_resamples} resamples, seed {b.seed}; SPEC 7).</p>")  # fmt: skip
    return _grid(header, rows) + note


def _rows_table(ev: dict[str, Any]) -> str:
    per, layers = ev.get("per_layer"), ev.get("layers")
    if not (isinstance(per, list) and per and all(isinstance(r, dict) for r in per)):
        return f"<pre>{html.escape(json.dumps(ev, indent=1)[:20000])}</pre>"
    keys = [k for k in per[0] if k != "layer"]
    layers = layers if isinstance(layers, list) and len(layers) == len(per) else None
    rows = [[r.get("layer", layers[i] if layers else i)] + [r.get(k, "") for k in keys]
            for i, r in enumerate(per)]  # fmt: skip
    mean = ev.get("mean")
    if isinstance(mean, dict):
        rows.append(["mean"] + [mean.get(k, "") for k in keys])
    return _grid(["layer", *keys], rows)


_INTERVAL_KEYS = ("rel_var_latent", "rel_var_token", "multi_layer_fraction_aggregate",
                  "multi_layer_fraction_token", "multi_layer_fraction_token_per_latent")  # fmt: skip


def _interval_cell(iv: Any) -> str:
    """'[low, high]' of an interval as analysis.json stores it ({low, high}), else '-'."""
    if not isinstance(iv, dict) or iv.get("low") is None or iv.get("high") is None:
        return "-"
    return _interval(Interval(float(iv["low"]), float(iv["high"])))


def _ratio_table(s: dict[str, Any]) -> str:
    keys = ["n_tokens", "n_latents", "n_latents_alive", "var_layer", "mean_var_latent",
            "mean_var_token", "rel_var_latent", "rel_var_token", "token_variance_factor",
            "multi_layer_fraction_aggregate", "multi_layer_fraction_token",
            "multi_layer_fraction_token_per_latent", "active_pair_fraction"]  # fmt: skip
    lens = any(c.get("space", "model") != s.get("space", "model") for c in s.get("compare") or [])
    tag = (lambda d: f" ({d.get('space', 'model')} space)") if lens else (lambda d: "")
    cols = [(f"this SAE{tag(s)}", s)]
    cols += [(f"compare: {c.get('label')}{tag(c)}", c) for c in s.get("compare") or []]
    cols += [(f"prompt {i + 1}", p) for i, p in enumerate(s.get("prompts") or [])]
    rows = [[k] + [d.get(k) for _, d in cols] for k in keys]
    paper_keys = ("rel_var_latent", "rel_var_token", "token_variance_factor",
                  "active_pair_fraction", "batch_tokens", "n_batches")  # fmt: skip
    for k in paper_keys:  # the paper code's formula (SPEC 4), beside ours
        vals = [(d.get("paper_formula") or {}).get(k) for _, d in cols]
        if any(v is not None for v in vals):
            rows.append([f"paper code: {k}", *vals])
    for k in _INTERVAL_KEYS:  # the context bootstrap (SPEC 7), where it was run
        vals = [_interval_cell((d.get("intervals") or {}).get(k)) for _, d in cols]
        if any(v != "-" for v in vals):
            rows.append([f"95% CI: {k}", *vals])
    for k in ("rel_var_latent", "rel_var_token"):
        vals = [_interval_cell((d.get("intervals") or {}).get(f"paper_{k}")) for _, d in cols]
        if any(v != "-" for v in vals):
            rows.append([f"95% CI: paper code: {k}", *vals])
    boots = [(d.get("intervals") or {}).get("bootstrap") for _, d in cols]
    if any(isinstance(b, dict) for b in boots):
        rows.append(["bootstrap contexts", *[b.get("n_contexts") if isinstance(b, dict) else None
                                             for b in boots]])  # fmt: skip
    ev_keys = ("fvu", "fvu_model", "mse", "delta_ce", "kl", "l0")  # held-out, from eval.json
    for k in ev_keys:
        vals = [(d.get("eval_mean") or {}).get(k) for _, d in cols]
        if any(v is not None for v in vals):
            rows.append([f"eval: {k}", *vals])
    return _grid(["quantity", *[c for c, _ in cols]], rows)


def lens_table(lens_eval: dict[str, Any]) -> str:
    """Per-layer KL and CE of the tuned lens vs the logit lens (`mlsae lens evaluate` JSON)."""
    t, lg = lens_eval.get("tuned") or {}, lens_eval.get("logit") or {}
    cond = lens_eval.get("cond") or []
    rows = [
        [layer, *(d.get(k, [None] * (i + 1))[i] for d, k in ((t, "kl"), (lg, "kl"), (t, "ce"),
                                                             (lg, "ce"))),
         cond[i] if i < len(cond) else None]
        for i, layer in enumerate(lens_eval.get("layers") or [])
    ]  # fmt: skip
    return _grid(["layer", "KL tuned", "KL logit", "CE tuned", "CE logit", "cond(I+A)"], rows)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_report(
    path: Path,
    s: dict[str, Any],
    figs: list[tuple[str, Path]],
    configs: dict[str, Any],
    ev: tuple[Path, EvalResult] | None,
    extra_sections: list[str] | None = None,
) -> Path:
    """Write the self-contained report.html atomically."""
    mean = ev[1].to_json()["mean"] if ev else None
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>mlsae analysis: {html.escape(Path(s['run']).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Where latents live: {html.escape(str(s['run']))}</h1>",
        f"<p>SAE <code>{html.escape(str(s['sae']))}</code>; data {_cell(s.get('data'))}.</p>",
        "<h2>Reading</h2><ul class=reading>",
        *[f"<li>{html.escape(t)}</li>" for t in reading(s, mean)],
        "</ul><h2>Layer statistics</h2>",
        _ratio_table(s),
    ]
    if s.get("prompts"):
        parts.append("<p>Prompts: " + "; ".join(
            f"{i + 1}: <q>{html.escape(p['text'])}</q>" for i, p in enumerate(s["prompts"])
        ) + "</p>")  # fmt: skip
    parts.append("<h2>Figures</h2>")
    for cap, p in figs:
        parts.append(f"<figure>{_img(p)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    if s.get("lens_eval"):
        le = s["lens_eval"]
        parts += [
            "<h2>Tuned lens</h2>",
            f"<p>Lens <code>{html.escape(str(le.get('path')))}</code>: KL(final || lens) and "
            "next-token CE per block on held-out tokens (nats). Lens-space SAEs see T_l(x); "
            "their reconstructions return through the exact inverse, so delta CE and KL are "
            "measured in the model's space, and eval: fvu_model is the FVU there.</p>",
            lens_table(le),
        ]
    if ev is not None:
        parts += [f"<h2>Evaluation <small>({html.escape(ev[0].name)})</small></h2>",
                  eval_table(ev[1])]  # fmt: skip
    else:
        parts.append("<h2>Evaluation</h2><p>No evaluation JSON in the run folder "
                     "(run <code>mlsae evaluate</code> to add one).</p>")  # fmt: skip
    parts += list(extra_sections or [])
    parts.append("<h2>Configuration</h2>")
    for name, cfg in configs.items():
        if isinstance(cfg, dict):
            parts += [f"<h3>{html.escape(name)}</h3>", _kv_table(cfg)]
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
