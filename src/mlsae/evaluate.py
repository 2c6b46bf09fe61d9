"""`mlsae evaluate`: per-layer FVU, MSE, L0, dead fraction, delta CE and KL on held-out tokens
(SPEC section 3), and the cross-layer matrix of single-layer SAEs vs the MLSAE.

Sources: an activation cache (reconstruction metrics on the cached vectors; delta CE / KL from
the model run on the cache's token ids), or the model run on the test split directly. One clean
pass per batch of contexts serves every SAE and every layer (splice.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.config import DataConfig, ModelConfig, save_json
from mlsae.errors import MlsaeError
from mlsae.metrics import LayerMetrics, mean_or_none

METRICS = ("fvu", "mse", "l0", "delta_ce", "kl")


class Space:
    """Maps vectors between the model's residual space and the SAE's input space: identity, or
    a tuned lens (SPEC 5) when the SAE was trained in lens space: to_sae = T_l, to_model = the
    exact inverse (lens.py)."""

    def __init__(self, lens: Any = None) -> None:
        self.lens = lens

    def to_sae(self, x: Tensor, layer: int) -> Tensor:
        return x if self.lens is None else self.lens.forward(x, layer)

    def to_model(self, x: Tensor, layer: int) -> Tensor:
        return x if self.lens is None else self.lens.inverse(x, layer)


@dataclass
class Entry:
    """One SAE to evaluate on some layers, with its streaming metrics."""

    label: str
    path: Path
    sae: Any  # sae.SparseAutoencoder (or anything with .cfg, .encode, .decode)
    layers: list[int]
    space: Space = field(default_factory=Space)
    metrics: LayerMetrics | None = None

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = LayerMetrics(self.layers, self.sae.cfg.d_in, self.sae.cfg.d_sae)

    def reconstruct(self, x: Tensor, layer: int, record: bool) -> Tensor:
        """x: [N, d] raw model space (lens space when the cache holds T_l(x)) -> x_hat [N, d] in
        the same space; optionally recording reconstruction metrics."""
        enc = self.sae.encode(x)
        x_hat = self.sae.decode(enc)
        if record:
            self.metrics.update(layer, x, x_hat, enc.top_indices, enc.top_acts)
        return x_hat

    def result(self, model: str) -> dict[str, Any]:
        r = self.metrics.result()
        return {**r, "sae": str(self.path), "model": model}


# ----------------------------------------------------------------------------- loading


def sae_dirs(run: str | Path) -> list[Path]:
    """SAE folders of a run: RUN itself (cfg.json), RUN/sae, or every subfolder with a cfg.json
    (sweeps, per-layer sets)."""
    run = Path(run)
    if (run / "cfg.json").is_file():
        return [run]
    if (run / "sae" / "cfg.json").is_file():
        return [run / "sae"]
    subs = sorted(p for p in run.glob("*") if (p / "cfg.json").is_file()) if run.is_dir() else []
    if not subs:
        raise MlsaeError(f"{run} is neither an SAE folder (cfg.json) nor a run folder with sae/")
    return subs


def load_entry(path: Path, label: str | None = None, layers: Sequence[int] | None = None) -> Entry:
    """Load an SAE folder; evaluate it on `layers` (default: the layers it was trained on)."""
    from mlsae.sae import load_sae

    sae = load_sae(path)
    trained = [int(x) for x in sae.cfg.layers]
    use = sorted(set(int(x) for x in (layers if layers is not None else trained)))
    if not use:
        raise MlsaeError(f"{path}: the SAE lists no layers; pass --layers")
    space = Space()
    if sae.cfg.lens:
        from mlsae.lens import load_lens

        lens_path = Path(sae.cfg.lens)
        if not lens_path.exists() and (path / lens_path).exists():
            lens_path = path / lens_path
        space = Space(load_lens(lens_path))
    if label is None:
        label = f"L{trained[0]}" if len(trained) == 1 else ("MLSAE" if trained else path.name)
    return Entry(label, path, sae, use, space)


def _check(entries: Sequence[Entry], n_layers: int | None, d_model: int) -> None:
    for e in entries:
        if e.sae.cfg.d_in != d_model:
            raise MlsaeError(
                f"SAE {e.path} has d_in {e.sae.cfg.d_in} but the model's width is {d_model}"
            )
        bad = [x for x in e.layers if n_layers is not None and not 0 <= x < n_layers]
        if bad:
            raise MlsaeError(f"layer(s) {bad} out of range: the model has {n_layers} blocks")
        if e.space.lens is not None and n_layers is not None:
            e.space.lens.check_model(n_layers, d_model)
            e.space.lens.check_layers(e.layers)


# ----------------------------------------------------------------------------- data


def _cache_contexts(cache: Any, max_tokens: int | None) -> Iterator[tuple[Tensor, Tensor, Any]]:
    """(ids [C, T], mask [C, T], shard) per shard, whole contexts, up to max_tokens."""
    ctx = cache.context_length
    if not ctx:
        raise MlsaeError(f"cache {cache.path} does not record its context_length")
    left = math.inf if max_tokens is None else math.ceil(max_tokens / ctx) * ctx
    for shard in cache.iter_ordered():
        if left <= 0:
            return
        n = int(min(len(shard.token_ids), left))
        left -= n
        if n % ctx:
            raise MlsaeError(f"cache {cache.path}: a shard does not hold whole contexts of {ctx}")
        yield shard.token_ids[:n].view(-1, ctx), shard.mask[:n].view(-1, ctx), shard


def _batches(contexts: Iterator[tuple[Tensor, Tensor]], batch_size: int):
    """Regroup (ids [C, T], used [C, T]) into batches of batch_size contexts."""
    buf_i: list[Tensor] = []
    buf_u: list[Tensor] = []
    for ids, used in contexts:
        buf_i.append(ids)
        buf_u.append(used)
        while sum(len(b) for b in buf_i) >= batch_size:
            ids_all, used_all = torch.cat(buf_i), torch.cat(buf_u)
            yield ids_all[:batch_size], used_all[:batch_size]
            buf_i, buf_u = [ids_all[batch_size:]], [used_all[batch_size:]]
    if buf_i and sum(len(b) for b in buf_i):
        yield torch.cat(buf_i), torch.cat(buf_u)


def _text_contexts(lm: Any, data: DataConfig, n_tokens: int) -> Iterator[tuple[Tensor, Tensor]]:
    from mlsae.capture import used_mask
    from mlsae.text import iter_contexts

    n_ctx = max(1, math.ceil(n_tokens / data.context_length))
    for i, ids in enumerate(iter_contexts(lm.tokenizer, data)):
        if i >= n_ctx:
            return
        yield ids[None], used_mask(ids[None], lm.special_ids)


# ----------------------------------------------------------------------------- engine


@torch.inference_mode()
def recon_from_cache(entries: Sequence[Entry], cache: Any, max_tokens: int | None) -> None:
    """Reconstruction metrics on the cached vectors (used tokens only)."""
    from tqdm import tqdm

    pos = {layer: i for i, layer in enumerate(cache.layers)}
    total = cache.n_tokens if max_tokens is None else min(cache.n_tokens, max_tokens)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="reconstruct") as bar:
        for ids, mask, shard in _cache_contexts(cache, max_tokens):
            acts = shard.activations[: ids.numel()][mask.reshape(-1)]  # [N_used, L_cache, d]
            for e in entries:
                for layer in e.layers:
                    e.reconstruct(acts[:, pos[layer]].float(), layer, record=True)
            bar.update(ids.numel())


@torch.inference_mode()
def run_model(
    entries: Sequence[Entry],
    model: Any,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    recon: bool,
    ce: bool,
    total_tokens: int | None = None,
) -> None:
    """One clean pass per batch shared by every SAE and layer: reconstruction metrics on the
    model's vectors (if recon) and delta CE / KL by splicing (if ce)."""
    from tqdm import tqdm

    from mlsae.splice import clean_pass, splice

    layers = sorted({x for e in entries for x in e.layers})
    desc = "delta CE" if ce else "reconstruct"
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc) as bar:
        for ids, used in batches:
            cp = clean_pass(model, ids, layers, used=used)
            for e in entries:
                for layer in e.layers:
                    x = e.space.to_sae(cp.vectors(layer), layer)
                    x_hat = e.reconstruct(x, layer, record=recon)
                    if ce:
                        s = splice(model, cp, layer, e.space.to_model(x_hat, layer))
                        e.metrics.update_splice(layer, s.ce_sum, s.kl_sum, s.n)
            bar.update(ids.numel())


def evaluate_entries(
    entries: list[Entry],
    *,
    cache: str | Path | None = None,
    model: str | None = None,
    dataset: str | None = None,
    split: str = "test",
    tokens: int | None = None,
    ce: bool = True,
    allow_train: bool = False,
    batch_size: int = 4,
    context_length: int | None = None,
    text_column: str = "text",
    hf_split: str = "train",
    model_dtype: str | None = None,
) -> str:
    """Fill every entry's metrics; returns the model name. See `evaluate_command`."""
    if batch_size < 1 or (tokens is not None and tokens < 1):
        raise MlsaeError("--batch-size and --tokens must be >= 1")
    cfg0 = entries[0].sae.cfg
    if cache is not None:
        from mlsae.cache import ActivationCache

        ac = ActivationCache(cache)
        man = ac.manifest
        if man.get("split") == "train" and not allow_train:
            raise MlsaeError(
                f"cache {cache} holds the train split: evaluate on held-out tokens "
                "(a cache built with --split test), or pass --allow-train"
            )
        missing = sorted({x for e in entries for x in e.layers} - set(ac.layers))
        if missing:
            raise MlsaeError(f"layer(s) {missing} are missing from the cache (it has {ac.layers})")
        for e in entries:
            if (man.get("lens") or None) != (e.sae.cfg.lens or None):
                raise MlsaeError(
                    f"cache lens {man.get('lens')!r} does not match SAE {e.path} lens "
                    f"{e.sae.cfg.lens!r}"
                )
        _check(entries, None, ac.d_model)
        name = model or man.get("model") or cfg0.model
        others = sorted({str(e.sae.cfg.model) for e in entries} - {str(man.get("model"))})
        if others:
            print(f"[mlsae] warning: cache model {man.get('model')!r}, SAE model(s) {others}",
                  file=sys.stderr)  # fmt: skip
        recon_from_cache(entries, ac, tokens)
        if ce:
            lm = _load(name, model_dtype or man.get("model_dtype") or "float32")
            _check(entries, lm.n_layers, lm.d_model)
            vocab = int(lm.model.get_input_embeddings().num_embeddings)
            ctxs = (_checked(i, vocab, cache) + (m,) for i, m, _ in _cache_contexts(ac, tokens))
            n = ac.n_tokens if tokens is None else min(ac.n_tokens, tokens)
            run_model(entries, lm.model, _batches(ctxs, batch_size), recon=False, ce=True,
                      total_tokens=n)  # fmt: skip
        return name
    if split == "train" and not allow_train:
        raise MlsaeError("evaluate on held-out tokens: --split test (or pass --allow-train)")
    name = model or cfg0.model
    lm = _load(name, model_dtype or "float32")
    _check(entries, lm.n_layers, lm.d_model)
    data = DataConfig(
        dataset=dataset or cfg0.dataset, split=split,  # type: ignore[arg-type]
        text_column=text_column, hf_split=hf_split,
    )  # fmt: skip
    if context_length is not None:
        data.context_length = context_length
    n = tokens if tokens is not None else 8192
    batches = _batches(_text_contexts(lm, data, n), batch_size)
    run_model(entries, lm.model, batches, recon=True, ce=ce, total_tokens=n)
    return name


def parse_layers(spec: str | None) -> list[int] | None:
    """CLI --layers: None, or an explicit list like '3', '0,5' or '0-11'."""
    if spec is None:
        return None
    if spec.strip().lower() in ("", "all"):
        raise MlsaeError("--layers: give explicit layers, e.g. '0-29' or '3,7'")
    from mlsae.capture import iter_layers_arg

    return iter_layers_arg(spec, 1 << 20)


def _checked(ids: Tensor, vocab: int, cache: Any) -> tuple[Tensor]:
    if ids.numel() and int(ids.max()) >= vocab:
        raise MlsaeError(f"cache {cache} holds token ids beyond the model's vocabulary ({vocab})")
    return (ids,)


def _load(name: str, dtype: str) -> Any:
    from mlsae.model import load_model

    return load_model(ModelConfig(model=name, dtype=dtype))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- commands


def evaluate_command(
    run: str | Path,
    out: str | Path,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`mlsae evaluate RUN --out FILE.json`: metrics of one SAE on held-out tokens.

    kwargs: cache, model, dataset, split, tokens, ce, allow_train, batch_size, context_length,
    model_dtype (see `evaluate_entries`). `layers` evaluates the SAE on other layers than it
    was trained on (e.g. a single-layer SAE on any layer). Writes and returns the JSON dict.
    """
    dirs = sae_dirs(run)
    if len(dirs) > 1:
        names = ", ".join(d.name for d in dirs)
        raise MlsaeError(f"{run} holds several SAEs ({names}): pass one of their folders")
    entry = load_entry(dirs[0], layers=layers)
    name = evaluate_entries([entry], **kwargs)
    result = entry.result(name)
    save_json(Path(out), result)
    print(format_table(result))
    return result


def _fmt(v: float | None, width: int = 9) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    return f"{v:{width}.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:{width}.2e}"


def format_table(result: dict[str, Any]) -> str:
    """Per-layer table with a mean row, then dead fraction and token count."""
    head = "layer" + "".join(k.rjust(10) for k in METRICS)
    rows = [head, "-" * len(head)]
    per = result["per_layer"]
    for i, layer in enumerate(result["layers"]):
        rows.append(f"{layer:5d}" + "".join(" " + _fmt(per[k][i]) for k in METRICS))
    rows.append(" mean" + "".join(" " + _fmt(result["mean"][k]) for k in METRICS))
    rows.append(f"dead fraction {result['dead_fraction']:.4f}   tokens {result['n_tokens']}")
    return "\n".join(rows)


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
    mlsae.metrics = LayerMetrics(mlsae.layers, mlsae.sae.cfg.d_in, mlsae.sae.cfg.d_sae)
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
    save_json(out / "cross.json", cross)
    for key in ("fvu", "delta_ce"):
        if any(v is not None for row in cross[key] for v in row):
            plot_cross(cross, key, out / f"cross_{key}.png")
    print(format_cross(cross))
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
    import os

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
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
