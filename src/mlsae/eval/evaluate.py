"""`mlsae evaluate`: per-layer FVU, MSE, L0, dead fraction, delta CE and KL on held-out tokens
(SPEC section 3), and the cross-layer matrix of single-layer SAEs vs the MLSAE.

Sources: an activation cache (reconstruction metrics on the cached vectors; delta CE / KL from
the model run on the cache's token ids), or the model run on the test split directly. One clean
pass per batch of contexts serves every SAE and every layer (splice.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.core.config import DataConfig, ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.lens.tuned import Space
from mlsae.sae.metrics import LayerMetrics

log = logging.getLogger(__name__)

METRICS = ("fvu", "mse", "l0", "delta_ce", "kl")


@dataclass
class Entry:
    """One SAE to evaluate on some layers, with its streaming metrics."""

    label: str
    path: Path
    sae: Any  # sae.SparseAutoencoder (or anything with .cfg, .encode, .decode)
    layers: list[int]
    space: Space = field(default_factory=Space)
    metrics: LayerMetrics | None = None  # in the SAE's space
    model_metrics: LayerMetrics | None = None  # in the model's space (lens SAEs only)
    lens_override: Path | None = None  # --lens: where the SAE's lens is now

    def __post_init__(self) -> None:
        self.reset_metrics()

    def reset_metrics(self) -> None:
        d_in, d_sae = self.sae.cfg.d_in, self.sae.cfg.d_sae
        self.metrics = LayerMetrics(self.layers, d_in, d_sae)
        lensed = self.space.lens is not None
        self.model_metrics = LayerMetrics(self.layers, d_in, d_sae) if lensed else None

    def reconstruct(
        self, x: Tensor, layer: int, record: bool, x_model: Tensor | None = None
    ) -> Tensor:
        """x: [N, d] SAE inputs of block `layer` -> the reconstruction [N, d] in the MODEL's space
        (through the exact lens inverse for a lens SAE), optionally recording metrics in both
        spaces. x_model: the model-space vectors (default: the inverse of x)."""
        enc = self.sae.encode(x)
        x_hat = self.sae.decode(enc)
        if record:
            self.metrics.update(layer, x, x_hat, enc.top_indices, enc.top_acts)
        if self.space.lens is None:
            return x_hat
        x_hat_model = self.space.to_model(x_hat, layer)
        if record:
            x_model = self.space.to_model(x, layer) if x_model is None else x_model
            self.model_metrics.update(layer, x_model, x_hat_model)
        return x_hat_model

    def result(self, model: str) -> dict[str, Any]:
        """metrics.result() plus, for a lens SAE, fvu_model / mse_model (model space) and
        lens_cond: cond(I + A_l) per layer, the exact inverse's worst-case error gain."""
        r = self.metrics.result()
        r["space"] = "model" if self.space.lens is None else "tuned-lens"
        if self.model_metrics is not None:
            mr = self.model_metrics.result()
            for k in ("fvu", "mse"):
                r["per_layer"][f"{k}_model"] = mr["per_layer"][k]
                r["mean"][f"{k}_model"] = mr["mean"][k]
            r["per_layer"]["lens_cond"] = [self.space.lens.cond(layer) for layer in self.layers]
            r["lens"] = self.sae.cfg.lens if self.lens_override is None else str(self.lens_override)
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


def load_entry(
    path: Path,
    label: str | None = None,
    layers: Sequence[int] | None = None,
    lens: Path | None = None,
) -> Entry:
    """Load an SAE folder; evaluate it on `layers` (default: the layers it was trained on).
    `lens` replaces the lens folder recorded in a lens SAE's cfg.json (a moved lens)."""
    from mlsae.lens.tuned import resolve_space
    from mlsae.sae.autoencoder import load_sae

    sae = load_sae(path)
    trained = [int(x) for x in sae.cfg.layers]
    use = sorted(set(int(x) for x in (layers if layers is not None else trained)))
    if not use:
        raise MlsaeError(f"{path}: the SAE lists no layers; pass --layers")
    space = resolve_space(sae.cfg.lens, None, override=lens, sae_dir=path, what=f"SAE {path}")
    if label is None:
        label = f"L{trained[0]}" if len(trained) == 1 else ("MLSAE" if trained else path.name)
    return Entry(label, path, sae, use, space, lens_override=lens)


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
    from mlsae.data.capture import used_mask
    from mlsae.data.text import iter_contexts

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
                    x = acts[:, pos[layer]].float()
                    x_model = None if e.space.cache_in_lens else x
                    e.reconstruct(e.space.cached_to_sae(x, layer), layer, True, x_model)
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

    from mlsae.eval.splice import clean_pass, splice

    layers = sorted({x for e in entries for x in e.layers})
    desc = "delta CE" if ce else "reconstruct"
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc) as bar:
        for ids, used in batches:
            cp = clean_pass(model, ids, layers, used=used)
            for e in entries:
                for layer in e.layers:
                    x_model = cp.vectors(layer)
                    x = e.space.to_sae(x_model, layer)
                    x_hat_model = e.reconstruct(x, layer, recon, x_model)
                    if ce:
                        s = splice(model, cp, layer, x_hat_model)
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
        from mlsae.activations.cache import ActivationCache
        from mlsae.lens.tuned import resolve_space

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
        for e in entries:  # the cache holds x (lens applied on the fly) or T_l(x)
            e.space = resolve_space(
                e.sae.cfg.lens, man.get("lens"), override=e.lens_override, sae_dir=e.path,
                what=f"SAE {e.path}",
            )  # fmt: skip
        _check(entries, None, ac.d_model)
        name = model or man.get("model") or cfg0.model
        others = sorted({str(e.sae.cfg.model) for e in entries} - {str(man.get("model"))})
        if others:
            log.warning(f"cache model {man.get('model')!r}, SAE model(s) {others}")  # fmt: skip
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
    from mlsae.data.capture import iter_layers_arg

    return iter_layers_arg(spec, 1 << 20)


def _checked(ids: Tensor, vocab: int, cache: Any) -> tuple[Tensor]:
    if ids.numel() and int(ids.max()) >= vocab:
        raise MlsaeError(f"cache {cache} holds token ids beyond the model's vocabulary ({vocab})")
    return (ids,)


def _load(name: str, dtype: str) -> Any:
    from mlsae.data.model import load_model

    return load_model(ModelConfig(model=name, dtype=dtype))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- commands


def evaluate_command(
    run: str | Path,
    out: str | Path,
    layers: Sequence[int] | None = None,
    lens: Path | None = None,
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
    entry = load_entry(dirs[0], layers=layers, lens=lens)
    name = evaluate_entries([entry], **kwargs)
    result = entry.result(name)
    write_json(Path(out), result)
    return result


def _fmt(v: float | None, width: int = 9) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    return f"{v:{width}.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:{width}.2e}"


def format_table(result: dict[str, Any]) -> str:
    """Per-layer table with a mean row, then dead fraction and token count. A lens SAE's FVU is
    in lens space; its fvu_model column is the FVU in the model's space."""
    per = result["per_layer"]
    keys = [*METRICS, *(k for k in ("fvu_model", "lens_cond") if k in per)]
    head = "layer" + "".join(k.rjust(10) for k in keys)
    rows = [head, "-" * len(head)]
    for i, layer in enumerate(result["layers"]):
        rows.append(f"{layer:5d}" + "".join(" " + _fmt(per[k][i]) for k in keys))
    rows.append(" mean" + "".join(" " + _fmt(result["mean"].get(k)) for k in keys))
    rows.append(f"dead fraction {result['dead_fraction']:.4f}   tokens {result['n_tokens']}")
    return "\n".join(rows)
