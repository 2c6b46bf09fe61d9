"""PNG figures of the analysis (matplotlib, Agg backend). Every function writes one file
atomically and returns its path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mlsae.analysis.geometry import GeometryResult  # noqa: E402
from mlsae.analysis.layers import LayerStatsResult  # noqa: E402
from mlsae.core.io import save_figure  # noqa: E402
from mlsae.eval.result import CrossResult  # noqa: E402

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path)


def _layer_ticks(ax: Axes, layers: Sequence[int], axis: str = "y") -> None:
    """At most ~11 tick labels showing block indices for columns 0..L-1."""
    step = max(1, math.ceil(len(layers) / 11))
    pos = list(range(0, len(layers), step))
    if axis == "y":
        ax.set_yticks(pos, [str(layers[i]) for i in pos])
    else:
        ax.set_xticks(pos, [str(layers[i]) for i in pos])


def heatmap(stats: LayerStatsResult, path: Path, title: str) -> Path:
    """Latent x layer heatmap of P(L=l | J=j), alive latents sorted by E[L | J=j]."""
    alive = np.isfinite(stats.expected_layer)
    order = np.argsort(stats.expected_layer[alive], kind="stable")
    P = stats.p_layer_given_latent[alive][order]  # [n_alive, L]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    if P.shape[0]:
        im = ax.imshow(
            P.T, aspect="auto", origin="lower", cmap="viridis", interpolation="antialiased", vmin=0
        )  # antialiased: thousands of latent columns are area-averaged, not dropped
        fig.colorbar(im, ax=ax, label="P(L=l | J=j)")
    else:
        ax.text(0.5, 0.5, "no active latents", ha="center", va="center", transform=ax.transAxes)
    _layer_ticks(ax, stats.layers)
    ax.set_xlabel(f"latent j ({P.shape[0]} active, sorted by E[L | J=j])")
    ax.set_ylabel("layer (block index)")
    ax.set_title(title)
    return _save(fig, path)


def expected_layer_hist(stats: LayerStatsResult, path: Path) -> Path:
    """Histogram of E[L | J=j] over alive latents."""
    e = stats.expected_layer[np.isfinite(stats.expected_layer)]
    lo, hi = min(stats.layers), max(stats.layers)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.hist(
        e, bins=np.linspace(lo - 0.5, hi + 0.5, 2 * (hi - lo + 1) + 1).tolist(), color="#3b6ea5"
    )
    ax.set_xlabel("E[L | J=j] (block index)")
    ax.set_ylabel("number of latents")
    ax.set_title("Expected layer of each latent")
    return _save(fig, path)


def layer_variance(stats: LayerStatsResult, path: Path) -> Path:
    """Per latent: the variance of the layer index for one token, E_T[Var(L|J=j,T)], against the
    variance aggregated over tokens, Var(L|J=j); the dashed line is equality."""
    ok = np.isfinite(stats.var_latent)
    x, y = stats.var_latent[ok], stats.var_token[ok]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.scatter(x, y, s=4, alpha=0.4, color="#3b6ea5", linewidths=0)
    top = float(max(x.max(initial=0), y.max(initial=0), 1e-9))
    ax.plot([0, top], [0, top], "--", color="grey", lw=1, label="equal")
    ax.set_xlabel("Var(L | J=j)  (aggregated over tokens)")
    ax.set_ylabel("E_T[Var(L | J=j, T)]  (one token)")
    ax.set_title("Layer variance per latent")
    ax.legend(loc="upper left")
    ax = axes[1]
    vals = [stats.var_layer, stats.mean_var_latent, stats.mean_var_token]
    names = ["Var(L)", "E_J[Var(L|J)]", "E_J,T[Var(L|J,T)]"]
    ax.bar(names, vals, color=["#888888", "#3b6ea5", "#d9822b"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    ax.set_ylabel("variance of the layer index")
    ax.set_title("Total, per-latent and per-token variance")
    return _save(fig, path)


def adjacent_cosine(geo: GeometryResult, path: Path) -> Path:
    """Mean cosine similarity of centred (and raw) residual vectors at adjacent layers."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = geo.layers[1:]
    ax.plot(x, geo.adjacent_cosine, "o-", color="#3b6ea5", label="centred")
    ax.plot(x, geo.adjacent_cosine_raw, "s--", color="#999999", ms=3, label="raw")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer l+1 (pair l, l+1)")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title("Adjacent-layer cosine similarity of residual vectors")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def residual_norms(geo: GeometryResult, path: Path) -> Path:
    """Distribution of ||x[t,l]|| by layer: median, 25-75% and 5-95% bands, mean."""
    q = {k: np.asarray(v) for k, v in geo.norm_quantiles.items()}
    x = geo.layers
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.fill_between(x, q["0.05"], q["0.95"], color="#3b6ea5", alpha=0.15, label="5-95%")
    ax.fill_between(x, q["0.25"], q["0.75"], color="#3b6ea5", alpha=0.35, label="25-75%")
    ax.plot(x, q["0.5"], "-", color="#3b6ea5", label="median")
    ax.plot(x, geo.norm_mean, "o", color="#d9822b", ms=3, label="mean")
    if np.all(np.asarray(geo.norm_min) > 0):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("||x[t, l]||")
    ax.set_title("Residual-stream norm by layer")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def make_figures(
    out: Path,
    stats: LayerStatsResult,
    geo: GeometryResult | None,
    prompts: Sequence[tuple[str, LayerStatsResult]] = (),
    compare: Sequence[tuple[str, LayerStatsResult]] = (),
) -> list[tuple[str, Path]]:
    """Write every figure into out/ and return [(caption, path)] in report order."""
    out = Path(out)
    figs = [
        (
            "P(L | J) aggregated over all tokens, latents sorted by E[L | J]",
            heatmap(stats, out / "heatmap_aggregate.png", "P(L=l | J=j), all tokens"),
        )
    ]
    for i, (text, st) in enumerate(prompts):
        short = text if len(text) <= 60 else text[:57] + "..."
        figs.append(
            (
                f"P(L | J) for prompt {i + 1}: {short!r} (sum over its tokens)",
                heatmap(st, out / f"heatmap_prompt_{i + 1}.png", f"prompt {i + 1}: {short!r}"),
            )
        )
    figs.append(("Histogram of E[L | J]", expected_layer_hist(stats, out / "expected_layer.png")))
    figs.append(
        ("Per-token vs aggregate layer variance", layer_variance(stats, out / "layer_var.png"))
    )
    for i, (name, st) in enumerate(compare):
        png = out / ("heatmap_compare.png" if i == 0 else f"heatmap_compare_{i + 1}.png")
        figs.append(
            (
                f"Comparison SAE ({name}): P(L | J) aggregated over all tokens",
                heatmap(st, png, f"{name}: P(L=l | J=j), all tokens"),
            )
        )
    if geo is not None:
        if len(geo.layers) > 1:
            figs.append(
                ("Adjacent-layer cosine similarity", adjacent_cosine(geo, out / "cosine.png"))
            )
        figs.append(("Residual norm by layer", residual_norms(geo, out / "norms.png")))
    return figs


def plot_cross(cross: CrossResult, key: str, path: Path) -> Path:
    """Heatmap in the style of the paper: single-layer SAEs as rows, evaluation layers as
    columns, the MLSAE as an extra row below a separator."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mat = np.array([[np.nan if v is None else v for v in row] for row in cross.matrix(key)], float)
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
    ax.set_xticks(range(n_c), [str(c) for c in cross.layers], fontsize=7)
    ax.set_yticks(range(n_r), cross.rows, fontsize=7)
    ax.set_xlabel("evaluation layer")
    ax.set_ylabel("SAE (trained on)")
    ax.set_title(
        f"{key}: single-layer SAEs vs MLSAE ({Path(cross.model or 'no model').name})", fontsize=9
    )
    return save_figure(fig, path)


def cross_figures(cross: CrossResult, out: Path) -> list[Path]:
    """out/cross_fvu.png and out/cross_delta_ce.png of an `evaluate --cross` result (those with
    values)."""
    return [
        plot_cross(cross, key, Path(out) / f"cross_{key}.png")
        for key in ("fvu", "delta_ce")
        if any(v is not None for row in cross.matrix(key) for v in row)
    ]
