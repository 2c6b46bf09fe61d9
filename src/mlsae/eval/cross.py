"""`mlsae evaluate --cross`: the cross-layer matrix of single-layer SAEs on every layer vs the
MLSAE (paper figure), sharing one clean pass per batch (evaluate.py's engine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlsae.core.bootstrap import Bootstrap, BootstrapInfo, Interval
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import write_json
from mlsae.core.layers import parse_layers
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import BootstrapConfig, EvalConfig
from mlsae.eval.entry import Entry
from mlsae.eval.evaluate import evaluate_entries, load_entry, open_eval_source
from mlsae.eval.result import METRICS, CrossResult, DiagonalPair, fmt_interval, fmt_value
from mlsae.sae.folders import RunFolder
from mlsae.sae.metrics import mean_or_none


def cross_command(
    mlsae_run: str | Path,
    sae_runs: Sequence[str | Path],
    out: str | Path,
    *,
    inputs: Inputs | None = None,
    ev: EvalConfig | None = None,
    boot: BootstrapConfig | None = None,
) -> CrossResult:
    """`mlsae evaluate --cross MLSAE_RUN SAE_RUN ... --out DIR`: every single-layer SAE on every
    layer of the MLSAE (or `inputs.source.layers`), the MLSAE on its own layers, sharing one
    clean pass per batch; each single-layer SAE vs the MLSAE on its own block paired over the
    same contexts (`boot`). Writes DIR/cross.json (the figures are the report stage's)."""
    inputs, ev, boot = inputs or Inputs.held_out(), ev or EvalConfig(), boot or BootstrapConfig()
    source, model = inputs.source, inputs.model
    check_output(out, "cross", inputs=[mlsae_run, *sae_runs, source.cache])
    layers = parse_layers(source.layers)
    mdirs = RunFolder(Path(mlsae_run)).sae_dirs()
    if len(mdirs) != 1:
        raise MlsaeError(f"{mlsae_run} holds {len(mdirs)} SAEs: pass the MLSAE's folder")
    mlsae = load_entry(mdirs[0], label="MLSAE")
    cols = sorted(set(layers)) if layers is not None else mlsae.layers
    singles = [load_entry(d, layers=cols) for r in sae_runs for d in RunFolder(Path(r)).sae_dirs()]
    if not singles:
        raise MlsaeError("--cross needs at least one single-layer SAE run after the MLSAE")
    singles.sort(key=lambda e: (list(e.sae.cfg.layers), e.label))
    mlsae.layers = [x for x in mlsae.layers if x in cols]
    rows = [*singles, mlsae]
    for e in rows:  # per-context sums for the paired intervals
        e.bootstrap = boot.bootstrap > 0
        e.reset_metrics()
    src = open_eval_source(rows, inputs)
    name = evaluate_entries(
        rows, src, model=model, ev=ev, tokens=source.tokens, batch_size=source.batch_size
    )
    mats = {}
    for key in METRICS:
        mat = []
        for e in rows:
            per = dict(zip(e.layers, e.metrics.per_layer()[key], strict=True))
            mat.append([per.get(c) for c in cols])
        mats[key] = mat
    cross = CrossResult(
        [e.label for e in rows],
        [[int(x) for x in e.sae.cfg.layers] for e in rows],
        cols,
        [str(e.path) for e in rows],
        name,
        mlsae.metrics.n_tokens,
        [e.metrics.dead_fraction() for e in rows],
        **mats,
    )
    if boot.bootstrap > 0:
        cross.diagonal, cross.bootstrap = paired_diagonal(cross, singles, mlsae, boot)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cross.json", cross.to_json())
    return cross


def paired_diagonal(
    cross: CrossResult, singles: list[Entry], mlsae: Entry, boot: BootstrapConfig
) -> tuple[list[DiagonalPair], BootstrapInfo | None]:
    """Each single-layer SAE vs the MLSAE on the SAE's own block: the FVU ratio and the delta
    CE difference, with intervals from resampling both SAEs' per-context sums with the same
    draws (a paired bootstrap: what the two share, the contexts, cancels)."""
    if mlsae.contexts is None or not mlsae.contexts.n_contexts:
        return [], None
    order = dict(mlsae.contexts.row)
    for e in singles:
        for c in e.contexts.row if e.contexts is not None else {}:
            order.setdefault(c, len(order))
    bs = Bootstrap(len(order), boot.bootstrap, boot.bootstrap_seed)
    both = mlsae.contexts.aligned(order)
    last = len(cross.rows) - 1
    pairs = []
    for r, e in enumerate(singles):
        own = [x for x in e.sae.cfg.layers if x in cross.layers]
        if len(own) != 1 or e.contexts is None:
            continue
        layer, col = own[0], cross.layers.index(own[0])
        one = e.contexts.aligned(order)
        jm, js = both.layers.index(layer), one.layers.index(layer)
        fvu_m, fvu_s = cross.fvu[last][col], cross.fvu[r][col]
        ratio = fvu_m / fvu_s if fvu_m is not None and fvu_s else None
        ratio_iv = bs.interval(both.fvu(bs)[:, jm] / one.fvu(bs)[:, js])
        ce_m, ce_s = cross.delta_ce[last][col], cross.delta_ce[r][col]
        diff, diff_iv = None, None
        if ce_m is not None and ce_s is not None:
            diff = ce_m - ce_s
            ce = both.per_position(bs, "ce")[:, jm] - one.per_position(bs, "ce")[:, js]
            diff_iv = bs.interval(ce)
        pairs.append(DiagonalPair(cross.rows[r], layer, ratio, ratio_iv, diff, diff_iv))
    return pairs, bs.info


def within(iv: Interval | None, limit: float) -> str:
    """'holds' when the whole interval is at or below `limit`, 'does not hold' when it is
    above, 'inconclusive' when it straddles it (docs/findings.md's verdict rule)."""
    if iv is None:
        return "no interval"
    if iv.high <= limit:
        return "holds"
    return "does not hold" if iv.low > limit else "inconclusive"


def format_cross(cross: CrossResult) -> str:
    """Diagonal vs off-diagonal: each single-layer SAE on its own layer and elsewhere, next to
    the MLSAE on the same layers."""
    cols, mrow = cross.layers, len(cross.rows) - 1
    lines = []
    for key in ("fvu", "delta_ce"):
        lines.append(
            f"{key:9s} {'SAE':>8s} {'diag':>9s} {'off-diag':>9s} {'MLSAE@diag':>11s} "
            f"{'MLSAE off':>10s}"
        )
        for r in range(mrow):
            own = [c for c in cross.row_layers[r] if c in cols]
            if len(own) != 1:
                continue
            j = cols.index(own[0])
            row, mla = cross.matrix(key)[r], cross.matrix(key)[mrow]
            off = mean_or_none([v for i, v in enumerate(row) if i != j])
            moff = mean_or_none([v for i, v in enumerate(mla) if i != j])
            lines.append(
                f"{'':9s} {cross.rows[r]:>8s} {fmt_value(row[j])} {fmt_value(off)} "
                f"{fmt_value(mla[j], 11)} {fmt_value(moff, 10)}"
            )
    if cross.diagonal and cross.bootstrap is not None:
        b = cross.bootstrap
        lines.append(
            f"MLSAE vs each single-layer SAE on its block, paired over {b.n_contexts} contexts "
            f"(95% percentile bootstrap, {b.n_resamples} resamples, seed {b.seed}):"
        )
        for p in cross.diagonal:
            ce = ""
            if p.delta_ce_diff is not None:
                ce = f"; delta CE MLSAE - single {p.delta_ce_diff:+.4f} "
                ce += fmt_interval(p.delta_ce_diff_interval, 0)
            lines.append(
                f"  {p.sae} at block {p.layer}: FVU MLSAE / single {fmt_value(p.fvu_ratio, 0)} "
                f"{fmt_interval(p.fvu_ratio_interval, 0)}, within 10%: "
                f"{within(p.fvu_ratio_interval, 1.10)}" + ce
            )
    return "\n".join(lines)
