"""`mlsae evaluate --cross`: the cross-layer matrix of single-layer SAEs on every layer vs the
MLSAE (paper figure), sharing one clean pass per batch (evaluate.py's engine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlsae.core.errors import MlsaeError
from mlsae.core.io import save_figure, write_json
from mlsae.eval.evaluate import METRICS, _fmt, evaluate_entries, load_entry, sae_dirs
from mlsae.sae.metrics import mean_or_none


def cross_command(
    mlsae_run: str | Path,
    sae_runs: Sequence[str | Path],
    out: str | Path,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`mlsae evaluate --cross MLSAE_RUN SAE_RUN ... --out DIR`: every single-layer SAE on every
    layer of the MLSAE (or `layers`), the MLSAE on its own layers, sharing one clean pass per
    batch. Writes DIR/cross.json and DIR/cross_fvu.png, DIR/cross_delta_ce.png."""
    mdirs = sae_dirs(mlsae_run)
    if len(mdirs) != 1:
        raise MlsaeError(f"{mlsae_run} holds {len(mdirs)} SAEs: pass the MLSAE's folder")
    mlsae = load_entry(mdirs[0], label="MLSAE")
    cols = sorted(set(layers)) if layers is not None else mlsae.layers
    singles = [load_entry(d, layers=cols) for r in sae_runs for d in sae_dirs(r)]
    if not singles:
        raise MlsaeError("--cross needs at least one single-layer SAE run after the MLSAE")
    singles.sort(key=lambda e: (list(e.sae.cfg.layers), e.label))
    mlsae.layers = [x for x in mlsae.layers if x in cols]
    mlsae.reset_metrics()
    name = evaluate_entries([*singles, mlsae], **kwargs)
    rows = [*singles, mlsae]
    cross: dict[str, Any] = {
        "rows": [e.label for e in rows],
        "row_layers": [[int(x) for x in e.sae.cfg.layers] for e in rows],
        "layers": cols,
        "sae": [str(e.path) for e in rows],
        "model": name,
        "n_tokens": mlsae.metrics.n_tokens,
        "dead_fraction": [e.metrics.dead_fraction() for e in rows],
    }
    for key in METRICS:
        mat = []
        for e in rows:
            per = dict(zip(e.layers, e.metrics.per_layer()[key], strict=True))
            mat.append([per.get(c) for c in cols])
        cross[key] = mat
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cross.json", cross)
    for key in ("fvu", "delta_ce"):
        if any(v is not None for row in cross[key] for v in row):
            plot_cross(cross, key, out / f"cross_{key}.png")
    return cross


def format_cross(cross: dict[str, Any]) -> str:
    """Diagonal vs off-diagonal: each single-layer SAE on its own layer and elsewhere, next to
    the MLSAE on the same layers."""
    cols, mrow = cross["layers"], len(cross["rows"]) - 1
    lines = []
    for key in ("fvu", "delta_ce"):
        lines.append(
            f"{key:9s} {'SAE':>8s} {'diag':>9s} {'off-diag':>9s} {'MLSAE@diag':>11s} "
            f"{'MLSAE off':>10s}"
        )
        for r in range(mrow):
            own = [c for c in cross["row_layers"][r] if c in cols]
            if len(own) != 1:
                continue
            j = cols.index(own[0])
            row, mla = cross[key][r], cross[key][mrow]
            off = mean_or_none([v for i, v in enumerate(row) if i != j])
            moff = mean_or_none([v for i, v in enumerate(mla) if i != j])
            lines.append(
                f"{'':9s} {cross['rows'][r]:>8s} {_fmt(row[j])} {_fmt(off)} "
                f"{_fmt(mla[j], 11)} {_fmt(moff, 10)}"
            )
    return "\n".join(lines)


def plot_cross(cross: dict[str, Any], key: str, path: Path) -> Path:
    """Heatmap in the style of the paper: single-layer SAEs as rows, evaluation layers as
    columns, the MLSAE as an extra row below a separator."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mat = np.array([[np.nan if v is None else v for v in row] for row in cross[key]], float)
    n_r, n_c = mat.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_c + 2), max(2.5, 0.4 * n_r + 1.2)))
    im = ax.imshow(
        np.ma.masked_invalid(mat), aspect="auto", cmap="magma_r", interpolation="nearest"
    )
    fig.colorbar(im, ax=ax, label={"fvu": "FVU", "delta_ce": "delta CE (nats)"}.get(key, key))
    if n_c <= 24 and n_r <= 24:
        hi = np.nanmax(mat) if np.isfinite(mat).any() else 0.0
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                color = "white" if v > 0.6 * hi else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
    ax.axhline(n_r - 1.5, color="black", lw=1.5)
    ax.set_xticks(range(n_c), [str(c) for c in cross["layers"]], fontsize=7)
    ax.set_yticks(range(n_r), cross["rows"], fontsize=7)
    ax.set_xlabel("evaluation layer")
    ax.set_ylabel("SAE (trained on)")
    ax.set_title(f"{key}: single-layer SAEs vs MLSAE ({Path(cross['model']).name})", fontsize=9)
    return save_figure(fig, path)
