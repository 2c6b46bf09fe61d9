"""`mlsae evaluate --cross`: the cross-layer matrix of single-layer SAEs on every layer vs the
MLSAE (paper figure), sharing one clean pass per batch (evaluate.py's engine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import write_json
from mlsae.core.layers import parse_layers
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import EvalConfig
from mlsae.eval.evaluate import evaluate_entries, load_entry, open_eval_source
from mlsae.eval.result import METRICS, CrossResult, fmt_value
from mlsae.sae.folders import RunFolder
from mlsae.sae.metrics import mean_or_none


def cross_command(
    mlsae_run: str | Path,
    sae_runs: Sequence[str | Path],
    out: str | Path,
    *,
    inputs: Inputs | None = None,
    ev: EvalConfig | None = None,
) -> CrossResult:
    """`mlsae evaluate --cross MLSAE_RUN SAE_RUN ... --out DIR`: every single-layer SAE on every
    layer of the MLSAE (or `inputs.source.layers`), the MLSAE on its own layers, sharing one
    clean pass per batch. Writes DIR/cross.json (the figures are the report stage's)."""
    inputs, ev = inputs or Inputs.held_out(), ev or EvalConfig()
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
    mlsae.reset_metrics()
    rows = [*singles, mlsae]
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cross.json", cross.to_json())
    return cross


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
    return "\n".join(lines)
