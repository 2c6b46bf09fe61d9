"""The numbers docs/findings.md quotes, as Markdown on stdout, from the output folder of
scripts/findings.sh: `python scripts/findings_report.py OUT`. Every table names the file it
came from; a stage whose file is missing prints "not run". Standard library only: it runs while
the study does (it only reads)."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

OUT = Path(".")
Row = list[Any]
Col = tuple[list[int], "list[Any] | None"]  # (layers, values per layer) of one table column


def emit(*lines: str) -> None:
    sys.stdout.write("\n".join(lines) + "\n")


def load(rel: str) -> Any:
    """OUT/rel as JSON; None when it is missing or unreadable (a stage not run, or running)."""
    try:
        return json.loads((OUT / rel).read_text())
    except (OSError, ValueError):
        return None


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(head: list[str], rows: list[Row]) -> None:
    emit("| " + " | ".join(head) + " |", "|" + "---|" * len(head))
    emit(*("| " + " | ".join(fmt(c) for c in r) + " |" for r in rows), "")


def source(*rels: str) -> None:
    """The files a table came from (those that exist; "path (what)" names a part of one)."""
    rels = tuple(r for r in rels if (OUT / r.split(" (")[0]).is_file())
    emit("Source: " + ", ".join(f"`OUT/{r}`" for r in rels), "")


def not_run(rel: str) -> None:
    emit(f"`OUT/{rel}`: not run", "")


def pick(layers: list[int]) -> list[int]:
    """Every third layer and the last (0, 3, ..., 27, 29 of 30)."""
    return sorted({*layers[::3], layers[-1]}) if layers else []


def at(layers: list[int], values: list[Any] | None, layer: int) -> Any:
    return values[layers.index(layer)] if values and layer in layers else None


def layer_table(head: list[str], show: list[int], cols: list[Col]) -> None:
    table(head, [[ly, *(at(ls, v, ly) for ls, v in cols)] for ly in show])


def stats3(values: list[Any], keys: list[Any]) -> list[Any]:
    """[min (its key), median, max (its key)] of the finite values."""
    ok = [(v, k) for v, k in zip(values, keys, strict=True) if isinstance(v, (int, float))]
    ok = [(v, k) for v, k in ok if not math.isnan(v)]
    if not ok:
        return ["-", "-", "-"]
    (lo, klo), (hi, khi) = min(ok), max(ok)
    return [f"{fmt(lo)} ({klo})", statistics.median(v for v, _ in ok), f"{fmt(hi)} ({khi})"]


def timings() -> list[list[str]]:
    try:
        lines = (OUT / "timings.tsv").read_text().splitlines()[1:]
    except OSError:
        return []
    return [ln.split("\t", 2) for ln in lines if ln.count("\t") >= 2]


def last_step(run: str, name: str | None = None) -> int | None:
    """The last optimizer step of SAE `name` (default: any) in OUT/run/metrics.jsonl."""
    step = None
    try:
        with open(OUT / run / "metrics.jsonl") as f:
            for line in f:
                r = json.loads(line) if line.strip().startswith("{") else {}
                step = r.get("step", step) if name in (None, r.get("sae")) else step
    except (OSError, ValueError):
        pass
    return step


# ----------------------------------------------------------------------------- sections


def s1_timings() -> None:
    emit("## 1. Timings", "")
    rows = timings()
    if not rows:
        return not_run("timings.tsv")
    source("timings.tsv")
    full, given = f"{OUT.resolve()}/", f"{OUT}/"
    short = lambda c: re.sub(
        r"\S*/mlsae ", "mlsae ", c.replace(full, "OUT/").replace(given, "OUT/")
    )
    out = [[s, int(t), round(int(t) / 60, 1), f"`{short(c)}`"] for s, t, c in rows]
    total = sum(r[1] for r in out)
    table(["stage", "s", "min", "command"], [*out, ["total", total, round(total / 60, 1), ""]])


def s2_mlsae() -> None:
    emit("## 2. MLSAE per layer (held-out test cache)", "")
    short = [re.search(r"--max-steps (\d+)", c) for s, _, c in timings() if s == "sweep_short"]
    runs = [
        (f"short_R{r}", f"short_R{r}", int(short[0][1]) if short and short[0] else None)
        for r in (8, 16)
    ]
    for r in (8, 16):
        d = ([p.name for p in sorted((OUT / "sweep").glob(f"sae_R{r}_k*"))] or [f"sae_R{r}_k*"])[0]
        runs.append((f"long_R{r}", f"sweep/{d}", last_step("sweep", d)))
    tc = load("sweep/train_cfg.json") or {}
    per_step = (tc.get("train") or {}).get("batch_tokens", 0) / max(len(tc.get("layers") or []), 1)
    rows, per, srcs, layers = [], [], [], []
    for name, d, steps in runs:
        if (ev := load(f"{d}/eval.json")) is None:
            not_run(f"{d}/eval.json")
            continue
        srcs.append(f"{d}/eval.json")
        m, no, layers = ev["mean"], ev.get("norm_outliers") or {}, ev["layers"]
        out = f"{sum(no['n_outliers'])} ({fmt(max(no['variance_share']))})" if no else "-"
        tok = round(steps * per_step) if steps and per_step else None
        # fvu_typical (FVU without norm-outlier tokens): in eval.json, or eval_typ.json (a
        # reconstruction-only re-evaluation by a newer mlsae)
        typ = ev if "fvu_typical" in ev["mean"] else (load(f"{d}/eval_typ.json") or ev)
        tm = typ["mean"].get("fvu_typical")
        rows.append(
            [
                name,
                steps,
                tok,
                ev["n_tokens"],
                m["fvu"],
                tm,
                m["delta_ce"],
                m["kl"],
                m["l0"],
                ev["dead_fraction"],
                out,
            ]
        )
        per += [
            [name, k, *(at(layers, ev["per_layer"][k], ly) for ly in pick(layers))]
            for k in ("fvu", "delta_ce")
        ]
        if tm is not None:
            per.append(
                [
                    name,
                    "fvu_typical (eval tokens: " + str(typ["n_tokens"]) + ")",
                    *(
                        at(typ["layers"], typ["per_layer"]["fvu_typical"], ly)
                        for ly in pick(layers)
                    ),
                ]
            )
    if not rows:
        return
    source(*srcs, "sweep/metrics.jsonl", "sweep/train_cfg.json", "timings.tsv")
    emit(
        "steps: short = sweep_short's --max-steps, long = last step of metrics.jsonl; text "
        "tokens = steps x batch_tokens / layers; outliers: vectors with a norm > 10x their "
        "layer's median (max variance share)",
        "",
    )
    table(
        [
            "run",
            "steps",
            "text tokens",
            "eval tokens",
            "mean FVU",
            "mean FVU w/o outliers",
            "mean dCE",
            "mean KL",
            "L0",
            "dead frac",
            "norm outliers",
        ],
        rows,
    )
    table(["run", "metric", *(f"L{ly}" for ly in pick(layers))], per)


def s3_cross() -> None:
    emit("## 3. MLSAE vs single-layer SAEs, on and off the diagonal", "")
    found = [OUT / "cross/cross.json", *sorted((OUT / "cross").glob("*.json"))]
    rel = next((f"cross/{p.name}" for p in found if p.is_file()), "cross/cross.json")
    if (cx := load(rel)) is None:
        return not_run(rel)
    source(rel)
    cols, m, fvu, dce = cx["layers"], len(cx["rows"]) - 1, cx["fvu"], cx["delta_ce"]
    singles = [(r, ls[0]) for r, ls in enumerate(cx["row_layers"][:m]) if len(ls) == 1]
    show = sorted({*pick(cols), *(ly for _, ly in singles)})
    emit(f"{cx['n_tokens']} tokens; FVU of each SAE (rows) at each layer (columns):", "")
    table(
        ["SAE", "dead frac (all layers)", *(f"L{c}" for c in show)],
        [
            [cx["rows"][r], cx["dead_fraction"][r], *(at(cols, fvu[r], c) for c in show)]
            for r in range(m + 1)
        ],
    )
    rows: list[Row] = []
    for r, ly in singles:
        at_ = [(o, cols.index(ly + o)) for o in (-6, -3, -1, 0, 1, 3, 6) if ly + o in cols]
        rows += [
            [cx["rows"][r], f"{o:+d}", ly + o, fvu[r][c], fvu[m][c], dce[r][c], dce[m][c]]
            for o, c in at_
        ]
        off = [
            (a, b)
            for i, (a, b) in enumerate(zip(fvu[r], fvu[m], strict=True))
            if cols[i] != ly and a is not None and b is not None
        ]
        if off:
            rows.append(
                [
                    cx["rows"][r],
                    "mean off",
                    "all but L",
                    *map(statistics.mean, zip(*off, strict=True)),
                    "",
                    "",
                ]
            )
    table(
        ["single SAE", "offset", "layer", "FVU single", "FVU MLSAE", "dCE single", "dCE MLSAE"],
        rows,
    )


VAR_KEYS = [
    "n_tokens",
    "n_latents_alive",
    "n_latents_dead",
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
]
PAPER_KEYS = [
    "batch_tokens",
    "n_batches",
    "last_partial_batch",
    "active_pair_fraction",
    "var_layer",
    "rel_var_latent",
    "rel_var_token",
    "token_variance_factor",
    "rel_var_token_normalised",
]


def variance_table(cols: list[tuple[str, dict[str, Any]]]) -> None:
    def hist(s: dict[str, Any]) -> str:  # shares of active (token, latent) pairs at 1, 2, >2
        h = [*(s.get("active_layers_hist") or []), 0, 0, 0]
        return " / ".join(fmt(x / (sum(h) or 1)) for x in (h[1], h[2], sum(h[3:])))

    rows: list[Row] = [[k, *(s.get(k) for _, s in cols)] for k in VAR_KEYS]
    rows.append(["pairs active at 1 / 2 / >2 layers", *(hist(s) for _, s in cols)])
    rows += [
        [f"eval_mean.{k}", *((s.get("eval_mean") or {}).get(k) for _, s in cols)]
        for k in ("fvu", "fvu_model", "delta_ce")
    ]
    rows += [
        [f"paper_formula.{k}", *((s.get("paper_formula") or {}).get(k) for _, s in cols)]
        for k in PAPER_KEYS
    ]
    table(["quantity", *(n for n, _ in cols)], rows)


def analysis_cols(rel: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    if (a := load(rel)) is None:
        not_run(rel)
        return []
    return [(name, a), *((f"{name}: compare {c.get('label')}", c) for c in a.get("compare", []))]


def s4_variance() -> None:
    emit("## 4. Where latents live: variance ratios and multi-layer fractions", "")
    cols = analysis_cols("analysis_R8/analysis.json", "R=8")
    cols += analysis_cols("analysis_R16/analysis.json", "R=16")
    saes = [s.get("sae") for _, s in cols]  # the same --compare SAE in both: shown once
    cols = [c for i, c in enumerate(cols) if c[1].get("sae") not in saes[:i]]
    if cols:
        source("analysis_R8/analysis.json", "analysis_R16/analysis.json")
        emit(
            "SPEC ratios (L = block index) first, then the paper code's formula (L = position "
            "0..L-1, batches of batch_tokens, inactive pairs counted as zeros)",
            "",
        )
        variance_table(cols)


def s5_geometry() -> None:
    emit("## 5. Residual geometry", "")
    rels = [r for r in ("analysis_R8/analysis.json", "analysis_R16/analysis.json") if load(r)]
    if not rels:
        return not_run("analysis_R8/analysis.json")
    a = load(rels[0])
    source(rels[0])
    ls, pairs = a["layers"], [f"{u}-{d}" for u, d in a["adjacent_pairs"]]
    table(
        ["quantity", "min (where)", "median", "max (where)"],
        [
            ["adjacent cosine, centred", *stats3(a["adjacent_cosine"], pairs)],
            ["adjacent cosine, raw", *stats3(a["adjacent_cosine_raw"], pairs)],
            ["mean norm", *stats3(a["norm_mean"], ls)],
            ["mean norm last / first", a["norm_mean"][-1] / a["norm_mean"][0], "", ""],
        ],
    )
    layer_table(
        ["layer", "mean norm", "median norm", "norm std", "cos(l, l+1) centred", "raw"],
        pick(ls),
        [
            (ls, a["norm_mean"]),
            (ls, a["norm_quantiles"].get("0.5")),
            (ls, a["norm_std"]),
            (ls[:-1], a["adjacent_cosine"]),
            (ls[:-1], a["adjacent_cosine_raw"]),
        ],
    )


def s6_lens() -> None:
    emit("## 6. Tuned lens", "")
    rows, evs = [], {}
    for rel in ("lens", "lens_floor"):
        if (ev := load(f"{rel}/eval.json")) is None:
            not_run(f"{rel}/eval.json")
            continue
        evs[rel], tr = ev, (load(f"{rel}/lens.json") or {}).get("training", {})
        c = [math.inf if x is None else x for x in ev.get("cond") or [math.nan]]
        n = len(ev["layers"]) - 1  # the last block is the identity
        rows.append(
            [
                rel,
                tr.get("min_singular"),
                tr.get("steps_run"),
                tr.get("stop_reason"),
                ev["n_kl_positions"],
                statistics.mean(ev["tuned"]["kl"][:n] or [math.nan]),
                statistics.mean(ev["logit"]["kl"][:n] or [math.nan]),
                ev["model_ce"],
                max(c),
                ev["layers"][c.index(max(c))],
                statistics.median(c),
            ]
        )
    if rows:
        source(*(f"{r}/{f}" for r in evs for f in ("eval.json", "lens.json")))
        emit("mean KL over blocks 0..L-2 (the last block is the identity)", "")
        table(
            [
                "lens",
                "min_singular",
                "KL steps",
                "stop",
                "KL positions",
                "mean KL tuned",
                "mean KL logit",
                "model CE",
                "max cond(I+A)",
                "at block",
                "median cond",
            ],
            rows,
        )
        show = pick(next(iter(evs.values()))["layers"])
        head = [f"{n} {c}" for n in evs for c in ("KL tuned", "KL logit", "cond")]
        cols = [
            (e["layers"], v)
            for e in evs.values()
            for v in (e["tuned"]["kl"], e["logit"]["kl"], e.get("cond"))
        ]
        layer_table(["block", *head], show, cols)
    ml, sh = load("mlsae_lens/eval.json"), load("short_R8/eval.json") or {}
    if ml is None:
        not_run("mlsae_lens/eval.json")
    else:
        source("mlsae_lens/eval.json", "short_R8/eval.json")
        emit(
            f"lens-space MLSAE (lens `{ml.get('lens')}`): fvu in lens space, fvu_model in the "
            "model's space (exact inverse); delta CE always in the model's space",
            "",
        )
        keys = ["fvu", "fvu_model", "delta_ce", "kl", "l0"]
        table(
            ["run", "space", "eval tokens", "dead frac", *(f"mean {k}" for k in keys)],
            [
                [n, e.get("space"), e["n_tokens"], e["dead_fraction"], *map(e["mean"].get, keys)]
                for n, e in (("mlsae_lens", ml), ("short_R8", sh))
                if e
            ],
        )
        ls, p, sl, sp = ml["layers"], ml["per_layer"], sh.get("layers", []), sh.get("per_layer", {})
        layer_table(
            [
                "layer",
                "FVU lens",
                "FVU model",
                "short_R8 FVU",
                "dCE lens",
                "short_R8 dCE",
                "lens_cond",
            ],
            pick(ls),
            [
                (ls, p["fvu"]),
                (ls, p.get("fvu_model")),
                (sl, sp.get("fvu")),
                (ls, p["delta_ce"]),
                (sl, sp.get("delta_ce")),
                (ls, p.get("lens_cond")),
            ],
        )
    if acols := analysis_cols("analysis_lens/analysis.json", "short_R8"):
        source("analysis_lens/analysis.json")
        variance_table(acols)


def s7_evolution() -> None:
    emit("## 7. Features across layers", "")
    singles = {
        r["layers"][0]: (d.name, r["per_layer"]["fvu"][0], r["n_tokens"])
        for d in sorted(OUT.glob("single_*"))
        if (r := (load(f"{d.name}/final_fvu.json") or {}).get("sae"))
    }
    pl, ev, cx = (
        load(f"{r}.json") for r in ("per_layer/final_fvu", "evolution/evolution", "cross/cross")
    )
    if pl is None:
        not_run("per_layer/final_fvu.json")
    else:
        own = {int(k.split("_")[-1]): v["per_layer"]["fvu"][0] for k, v in pl.items()}
        n_vec = sorted(v["n_tokens"] for v in pl.values())
        held = {m["down_layer"]: m["own"] for m in (ev or {}).get("match", [])}
        diag = (
            {
                ls[0]: cx["fvu"][r][cx["layers"].index(ls[0])]
                for r, ls in enumerate(cx["row_layers"][:-1])
                if len(ls) == 1 and ls[0] in cx["layers"]
            }
            if cx
            else {}
        )
        source(
            "per_layer/final_fvu.json",
            *(f"{n}/final_fvu.json" for n, *_ in singles.values()),
            "evolution/evolution.json (match.own)",
            "cross/cross.json (diagonal)",
        )
        runs = ["per_layer", *(n for n, *_ in singles.values())]
        emit(
            "train: final_fvu.json (training tokens); held-out: the per-layer SAE's own FVU from "
            "evolution's SAE Match, the single SAE's from the cross matrix. Last steps: "
            f"{', '.join(f'{n} {fmt(last_step(n))}' for n in runs)}; final_fvu vectors per "
            f"layer: per-layer SAEs {n_vec[0]}-{n_vec[-1]}, single SAEs "
            f"{', '.join(str(v[2]) for v in singles.values())}; mean per-layer train FVU "
            f"{fmt(statistics.mean(own.values()))}",
            "",
        )
        table(
            [
                "layer",
                "per-layer SAE (train)",
                "single SAE (train)",
                "per-layer (held-out)",
                "single (held-out)",
            ],
            [
                [ly, own.get(ly), singles.get(ly, (0, None))[1], held.get(ly), diag.get(ly)]
                for ly in sorted({*pick(sorted(own)), *singles})
            ],
        )
    if ev is None:
        return not_run("evolution/evolution.json")
    source("evolution/evolution.json")
    st, ps, ms = ev["settings"], ev["pairs"], ev["match"]
    emit(
        f"{ev['n_used_tokens']} used tokens; pass-through: best next-layer Pearson >= "
        f"{st['pass_through']}; appear/disappear: best Pearson < {st['link_threshold']}; AND/OR: "
        f"exactly two parents with necessity/sufficiency >= {st['boolean_threshold']}; "
        f"specialised: necessity >= {st['specialise_necessity']} and sufficiency <= "
        f"{st['specialise_sufficiency']}; fractions are of alive features",
        "",
    )
    table(["finding", "value"], [[k, v] for k, v in ev["findings"].items()])
    names = [f"{p['up_layer']}-{p['down_layer']}" for p in ps]
    keys = ["pass_through", "appear", "disappear", "specialised", "n_and", "n_or", "alive_down"]
    table(
        ["per pair", "min (pair)", "median", "max (pair)"],
        [[k, *stats3([p[k] for p in ps], names)] for k in keys]
        + [
            [f"match FVU {k}", *stats3([m[k] for m in ms], names)]
            for k in ("matched", "matched_target_scale", "unpermuted", "own")
        ],
    )
    c, dead = ev.get("communities") or {}, ev["dead"]
    emit(
        f"communities ({c.get('method')}): {c.get('n_communities')} with >= 2 features, largest "
        f"{c.get('largest')}, median size {fmt(c.get('median_size'))}, mean layer span "
        f"{fmt(c.get('mean_layer_span'))}, {c.get('n_singletons')} singletons; dead features "
        f"per layer min / median / max: {' / '.join(map(fmt, stats3([*dead.values()], [*dead])))}",
        "",
    )


def main() -> None:
    global OUT
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/findings_report.py OUT (scripts/findings.sh's folder)")
    OUT = Path(sys.argv[1])
    emit(f"# Findings study: `{OUT}`", "")
    for s in (s1_timings, s2_mlsae, s3_cross, s4_variance, s5_geometry, s6_lens, s7_evolution):
        try:
            s()
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            emit(f"(this section's files have an unexpected form: {type(e).__name__} {e})", "")


if __name__ == "__main__":
    main()
