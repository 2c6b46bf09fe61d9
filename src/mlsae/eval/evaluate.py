"""`mlsae evaluate`: per-layer FVU, MSE, L0, dead fraction, delta CE and KL on held-out tokens
(SPEC section 3), and the cross-layer matrix of single-layer SAEs vs the MLSAE.

Sources: an activation cache (reconstruction metrics on the cached vectors; delta CE / KL from
the model run on the cache's token ids), or the model run on the test split directly. One clean
pass per batch of contexts serves every SAE and every layer (splice.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PreTrainedModel

from mlsae.activations.cache import ActivationCache
from mlsae.activations.live import LiveSource
from mlsae.activations.source import ActivationSource
from mlsae.core.config import ModelConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import HELD_OUT_TOKENS, Inputs
from mlsae.core.io import write_json
from mlsae.core.layers import parse_layers
from mlsae.core.outputs import check_output
from mlsae.core.stage_config import BootstrapConfig, EvalConfig
from mlsae.eval.entry import Entry
from mlsae.eval.result import EvalResult
from mlsae.sae.crosscoder import token_pass
from mlsae.sae.folders import RunFolder

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlsae.eval.splice import BatchObserver

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loading


def load_entry(
    path: Path,
    label: str | None = None,
    layers: Sequence[int] | None = None,
    lens: Path | None = None,
) -> Entry:
    """Load an SAE folder; evaluate it on `layers` (default: the layers it was trained on).
    `lens` replaces the lens folder recorded in a lens SAE's cfg.json (a moved lens)."""
    from mlsae.lens.tuned import resolve_space
    from mlsae.sae.folders import load_sae

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


@torch.inference_mode()
def recon_from_source(
    entries: Sequence[Entry], source: ActivationSource, max_tokens: int | None
) -> None:
    """Reconstruction metrics on the source's stored vectors (used tokens only)."""
    from tqdm import tqdm

    pos = {layer: i for i, layer in enumerate(source.layers)}
    total = source.n_tokens if max_tokens is None else min(source.n_tokens, max_tokens)
    ctx_len = max(1, source.context_length)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="reconstruct") as bar:
        for block in source.iter_ordered(max_tokens):
            n = len(block.token_ids)
            acts = block.activations[block.mask]  # [N_used, L_source, d]
            ctx = ((block.offset + torch.arange(n)) // ctx_len)[block.mask.cpu()]  # [N_used]
            for e in entries:
                space = e.space
                e.done = token_pass(
                    e.sae,
                    e.layers,
                    lambda ly, space=space, acts=acts: space.cached_to_sae(
                        acts[:, pos[ly]].float(), ly
                    ),
                )
                for layer in e.layers:
                    x = acts[:, pos[layer]].float()
                    x_model = None if e.space.cache_in_lens else x
                    norm = x.norm(dim=-1) if e.thresholds else None
                    x_sae = e.space.cached_to_sae(x, layer)
                    e.reconstruct(x_sae, layer, True, x_model, norm, contexts=ctx)
            bar.update(n)


@torch.inference_mode()
def run_model(
    entries: Sequence[Entry],
    model: PreTrainedModel,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    recon: bool,
    ce: bool,
    total_tokens: int | None = None,
    observers: Sequence[BatchObserver] = (),
) -> None:
    """One clean pass per batch shared by every SAE and layer: reconstruction metrics on the
    model's vectors (if recon) and delta CE / KL by splicing (if ce); then each observer
    (--replace, SAEBench's ablations) gets the clean pass."""
    from tqdm import tqdm

    from mlsae.eval.batched import splice_layers
    from mlsae.eval.splice import clean_pass

    layers = sorted({x for e in entries for x in e.layers})
    vocab = int(next(model.get_input_embeddings().parameters()).shape[0])
    desc = "delta CE" if ce else "reconstruct"
    first = 0  # context index of the batch's first row (batches are whole contexts in order)
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc) as bar:
        for ids, used in batches:
            if ids.numel() and int(ids.max()) >= vocab:
                raise MlsaeError(
                    f"token ids beyond the model's vocabulary ({vocab}): not its tokens"
                )
            cp = clean_pass(model, ids, layers, used=used)
            rows = torch.arange(first, first + ids.shape[0])  # [B] context of each row
            ctx = rows[:, None].expand(ids.shape)[cp.used.cpu()]  # [N_used], as cp.vectors
            first += ids.shape[0]
            for e in entries:
                recons = {}  # layer -> reconstruction in the model's space (for delta CE)
                e.done = token_pass(e.sae, e.layers, lambda ly: e.space.to_sae(cp.vectors(ly), ly))  # noqa: B023
                for layer in e.layers:
                    x_model = cp.vectors(layer)
                    x = e.space.to_sae(x_model, layer)
                    x_hat_model = e.reconstruct(x, layer, recon, x_model, contexts=ctx)
                    if ce:
                        recons[layer] = x_hat_model
                plain = splice_layers(model, cp, recons)  # continuations batched
                if e.extras is not None and ce:  # the outlier positions left clean
                    e.extras.splice_typical(model, cp, recons, plain, rows)
                for layer, s in plain.items():
                    e.metrics.update_splice(layer, s.ce_sum, s.kl_sum, s.n)
                    if e.contexts is not None and s.rows is not None:
                        r = s.rows
                        e.contexts.update_splice(layer, rows, r[:, 0], r[:, 1], r[:, 2])
            for o in observers:
                o.update(model, cp)
            bar.update(ids.numel())


def open_eval_source(entries: Sequence[Entry], inputs: Inputs) -> ActivationSource:
    """The held-out activations for `entries`' blocks: the cache, or the model (default: the
    SAEs') on 8,192 tokens of the data (default: the SAEs' dataset, test split)."""
    from mlsae.activations.open import open_source

    source, data, model = inputs.parts()
    cfg0 = entries[0].sae.cfg
    layers = sorted({x for e in entries for x in e.layers})
    return open_source(
        Inputs(
            replace(source, layers=None),
            replace(data, dataset=data.dataset or cfg0.dataset),
            replace(model, model=model.model or cfg0.model),
        ),
        default_tokens=HELD_OUT_TOKENS,
        layers=layers,
    )


def evaluate_entries(
    entries: list[Entry],
    source: ActivationSource,
    *,
    model: ModelConfig | None = None,
    ev: EvalConfig | None = None,
    tokens: int | None = None,
    batch_size: int = 8,
    observers: Sequence[BatchObserver] = (),
) -> str | None:
    """Fill every entry's metrics from `source` (up to `tokens` tokens); returns the model name
    (None: a cache without one, e.g. synthetic). A cache gives the reconstruction metrics;
    delta CE / KL run the model (`model`, default the cache's) on its token ids. A live source serves both from one clean pass per batch."""
    from mlsae.activations.open import source_model
    from mlsae.core.compute import resolve_device
    from mlsae.lens.tuned import resolve_space

    ev = ev or EvalConfig()
    if source.info.get("split") == "train" and not ev.allow_train:
        raise MlsaeError(
            f"{source.describe()} holds the train split: evaluate on held-out tokens "
            "(--split test, or a cache built with --split test), or pass --allow-train"
        )
    missing = sorted({x for e in entries for x in e.layers} - set(source.layers))
    if missing:
        raise MlsaeError(
            f"layer(s) {missing} are missing from {source.describe()} (it has {source.layers})"
        )
    device = resolve_device(model.device if model is not None else "auto")
    for e in entries:  # the source holds x (lens applied on the fly) or T_l(x)
        if isinstance(e.sae, torch.nn.Module):  # (duck-typed SAEs stay where they are)
            e.sae.to(device)
        e.space = resolve_space(
            e.sae.cfg.lens,
            source.lens,
            override=e.lens_override,
            sae_dir=e.path,
            what=f"SAE {e.path}",
        )
        e.reset_metrics()
    _check(entries, None, source.d_model)
    for e in entries:
        if (msg := e.sae.cfg.sink_mismatch(source.info.get("exclude_sink"))) is not None:
            log.warning(f"SAE {e.path}: {msg}")
    others = sorted({str(e.sae.cfg.model) for e in entries} - {str(source.info.get("model"))})
    if others:
        log.warning(f"activations of model {source.info.get('model')!r}, SAE model(s) {others}")
    n = source.n_tokens if tokens is None else min(source.n_tokens, tokens)
    live = source.lm if isinstance(source, LiveSource) else None
    if live is not None:  # the model runs anyway: one clean pass for both
        _check(entries, live.n_layers, live.d_model)
        run_model(
            entries,
            live.model,
            source.token_batches(batch_size, tokens),
            recon=True,
            ce=ev.ce,
            total_tokens=n,
            observers=observers,
        )
        return str(live.name)
    recon_from_source(entries, source, tokens)
    if ev.ce:
        lm = source_model(source, model)
        _check(entries, lm.n_layers, lm.d_model)
        run_model(
            entries,
            lm.model,
            source.token_batches(batch_size, tokens),
            recon=False,
            ce=True,
            total_tokens=n,
            observers=observers,
        )
        return str(lm.name)
    name = model.model if model is not None and model.model else source.info.get("model")
    return None if name is None else str(name)  # None: no language model (a synthetic cache)


# ----------------------------------------------------------------------------- commands


def evaluate_command(
    run: str | Path,
    out: str | Path,
    *,
    inputs: Inputs | None = None,
    ev: EvalConfig | None = None,
    lens: Path | None = None,
    boot: BootstrapConfig | None = None,
    observe: Callable[[list[Entry]], list[BatchObserver]] | None = None,
    finish: Callable[[EvalResult, list[BatchObserver]], None] | None = None,
) -> EvalResult:
    """`mlsae evaluate RUN --out FILE.json`: metrics of one SAE on held-out tokens
    (`inputs.source`: a cache, else the model on the test split; default `Inputs.held_out()`),
    with bootstrap intervals over the contexts (`boot`). `source.layers` evaluates the SAE on
    other layers than it was trained on (e.g. a single-layer SAE on any layer). `lens`: where a
    lens SAE's lens folder is now.
    observe(entries): observers of the clean passes; finish(result, observers) adds their
    sections (eval/several.py). Writes the JSON and returns the result."""
    inputs = inputs or Inputs.held_out()
    source, model = inputs.source, inputs.model
    ev, boot = ev or EvalConfig(), boot or BootstrapConfig()
    check_output(out, "eval", file=True, inputs=[run, source.cache, lens])
    if (ev.replace is not None or ev.format != "mlsae") and observe is None:
        raise MlsaeError("--replace / --format saebench: call mlsae.eval.several.evaluate_run")
    entry = load_entry(
        RunFolder(Path(run)).sae_dir(), layers=parse_layers(source.layers), lens=lens
    )
    entry.bootstrap = boot.bootstrap > 0
    src = open_eval_source([entry], inputs)
    rep = None
    if isinstance(src, ActivationCache) and set(entry.layers) <= set(src.layers):
        # (a cache only: the model would have to run twice more otherwise)
        from mlsae.activations.norms import norm_outliers

        rep = norm_outliers(src, max_tokens=source.tokens).select(entry.layers)
        if sum(rep.n_outliers):  # FVU without them too (fvu_typical)
            entry.thresholds = {
                ly: rep.factor * m for ly, m in zip(rep.layers, rep.median_norm, strict=True)
            }
    observers = observe([entry]) if observe is not None else []  # --replace, --format saebench
    name = evaluate_entries(
        [entry],
        src,
        model=model,
        ev=ev,
        tokens=source.tokens,
        batch_size=source.batch_size,
        observers=observers,
    )
    result = entry.result(name, boot)
    result.exclude_sink = bool(src.info.get("exclude_sink", False))
    result.norm_outliers = rep
    if finish is not None:
        finish(result, observers)
    write_json(Path(out), result.to_json())
    return result


def format_table(result: EvalResult) -> str:
    """The per-layer table of an evaluation (EvalResult.table)."""
    return result.table()
