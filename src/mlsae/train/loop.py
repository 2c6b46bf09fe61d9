"""`mlsae train`: the training loop of the MLSAE, single-layer baselines, sweeps and per-layer
sets, with checkpoints and exact resume (SPEC section 2).

A run trains one or more "members" (SAEs) in one pass over an activation cache; each batch of
vectors is read once and fed to all of them:
- MLSAE (default) / single-layer baseline: one SAE on all chosen layers / one layer; folder sae/.
- sweep (several --expansion-factor / -k): the grid, one folder sae_R{R}_k{k}/ each.
- per-layer set (--per-layer): one SAE per chosen layer, folders layer_XX/ + per_layer.json; a
  batch holds batch_tokens vectors per layer and each SAE gets its own layer's vectors.

Dead latents are counted in tokens of text: a batch of B vectors drawn from L layers is B / L
tokens for an SAE trained on those L layers (a single-layer SAE: B vectors = B tokens). A latent
is dead once it has not fired (activation > 0) for `dead_tokens` tokens.

Exact resume: the data order is a pure function of (seed, epoch, batch index) (cache.shuffled
with skip_batches), and checkpoints hold all weights, Adam states, counters and the position.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource, Batch
from mlsae.core.compute import resolve_compute_dtype
from mlsae.core.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    SaeConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.errors import Interrupted, MlsaeError
from mlsae.core.io import write_json
from mlsae.core.lock import folder_lock
from mlsae.core.outputs import check_output, check_writable
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import PER_LAYER, RUN_CFG
from mlsae.sae.kernels import kernel_backend, set_malloc_retain
from mlsae.train.checkpoint import StopSignals, load_checkpoint, open_metrics, save_checkpoint
from mlsae.train.member import Member, NonFinite, all_finite, make_adam, update_dead_counter
from mlsae.train.memory import check_training_memory, training_disk
from mlsae.train.run import check_new_run, plan_run, read_run, save_run

log = logging.getLogger(__name__)

EVAL_VECTORS = 65536
"""Vectors of the final per-layer FVU pass (train tokens; `mlsae evaluate` does held-out)."""
__all__ = ["Member", "make_adam", "run_training", "train_command", "update_dead_counter"]


# ----------------------------------------------------------------------------- run setup


# ----------------------------------------------------------------------------- the loop


def run_training(out: Path, run: RunConfig, source: ActivationSource) -> list[Member]:
    """Train (or continue) the run in `out` on `source`; returns the members with their final
    weights."""
    from tqdm import tqdm

    cfg = run.train
    if source.d_model != run.d_in:
        raise MlsaeError(
            f"mismatched d_in: the run's SAEs take d_in = {run.d_in} but {source.describe()} "
            f"holds d_model = {source.d_model}"
        )
    layers = list(run.layers)
    source.layer_positions(layers)  # every layer of the run must be in the source
    to_sae = sae_inputs(run, source, layers)
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    set_malloc_retain(True)  # no page faults for each step's large temporaries
    kernel_backend()  # build/load the native kernels now; logs which backend runs
    members = []
    for s in run.members:
        sc = SaeConfig(
            d_in=run.d_in, expansion_factor=s.expansion_factor, k=s.k,
            normalize=run.sae.normalize, layers=list(s.layers), model=run.model.name,
            dataset=run.data.name, lens=run.lens, exclude_sink=run.data.exclude_sink,
        )  # fmt: skip
        sae = SparseAutoencoder(sc, seed=s.seed, compute_dtype=dtype)
        since = torch.zeros(sc.d_sae, dtype=torch.float64)
        layer = s.layers[0] if run.mode == "per_layer" else None
        members.append(Member(s.name, sae, make_adam(sae.parameters(), cfg), layer, since))
    read_batch, per_epoch = batches_per_epoch(run, source)
    total = per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    have = getattr(source, "fingerprint", None)
    if run.fingerprint is not None and have is not None and have != run.fingerprint:
        raise MlsaeError(
            f"{source.describe()} is not the data this run started on (its shards changed "
            f"since: fingerprint {have[:12]}, the run's {run.fingerprint[:12]}): resume needs "
            "that cache; train a new run with --out instead"
        )
    step = epoch = batch_i = 0
    ck = load_checkpoint(out)
    if ck is not None:
        step, epoch, batch_i = ck["step"], ck["epoch"], ck["batch"]
        for m in members:
            if m.name not in ck["members"]:
                raise MlsaeError(f"checkpoint of {out} lacks SAE {m.name}: not this run's")
            m.load(ck["members"][m.name])
        log.info(f"resuming {out} at step {step} (epoch {epoch}, batch {batch_i}) with the "
                 f"settings of {RUN_CFG}")  # fmt: skip
    save_run(out, run)  # a resume's new --max-steps / --epochs hold from here on
    k_aux = cfg.resolved_k_aux(run.d_in)

    saved = [step]  # the step of the last checkpoint

    def checkpoint() -> None:
        bad = [m.name for m in members if not all_finite(m.sae.parameters())]
        if bad:  # never reached: the step checks first; a non-finite SAE is never saved
            raise MlsaeError(f"SAE(s) {bad} hold NaN or inf weights at step {step}: not saved")
        saved[0] = step
        state = {"step": step, "epoch": epoch, "batch": batch_i}
        save_checkpoint(out, {**state, "members": {m.name: m.state() for m in members}})
        for m in members:
            m.sae.save(out / m.name)

    metrics_log = open_metrics(out, step)
    wb = _wandb_start(out, run) if cfg.wandb else None
    bar = tqdm(total=total, initial=step, unit="step", desc="train", dynamic_ncols=True)
    t_start, v_done = time.perf_counter(), 0
    try:
        with StopSignals() as sig, bar, metrics_log:
            while step < total and epoch < cfg.epochs:
                batches = source.shuffled(
                    read_batch, layers, seed=cfg.seed, epoch=epoch, skip_batches=batch_i,
                    buffer_shards=cfg.shuffle_buffer_shards, drop_last=True,
                )  # fmt: skip
                t0 = time.perf_counter()
                for batch in batches:
                    batch.x = to_sae(batch)
                    if not all_finite([batch.x]):
                        raise MlsaeError(f"the vectors of step {step + 1} from "
                                         f"{source.describe()} hold NaN or inf")  # fmt: skip
                    rows, n_step = [], 0
                    for m in members:
                        x = _member_x(m, batch)
                        if len(x) < 2:
                            continue
                        try:
                            rows.append({"sae": m.name, **m.step(x, cfg, k_aux)})
                        except NonFinite as e:
                            raise MlsaeError(
                                f"training diverged at step {step + 1}: {e}; lower --lr (lr "
                                f"{cfg.lr:g}). Nothing of this step was saved; the run's last "
                                f"checkpoint (step {saved[0]}) holds finite weights"
                            ) from None
                        n_step += len(x)
                    step, batch_i = step + 1, batch_i + 1
                    t1 = time.perf_counter()
                    vps = n_step / max(t1 - t0, 1e-9)
                    v_done += n_step
                    for r in rows:
                        metrics_log.write(
                            json.dumps({"step": step, "epoch": epoch, **r, "vectors_per_s": vps})
                            + "\n"
                        )
                    metrics_log.flush()
                    if wb is not None:
                        wb.log(
                            {
                                f"{r['sae']}/{k}": v
                                for r in rows
                                for k, v in r.items()
                                if k != "sae"
                            },
                            step=step,
                        )
                    bar.set_postfix(
                        fvu=f"{rows[0]['fvu']:.3f}" if rows else "-", vec_s=f"{vps:.0f}"
                    )
                    bar.update(1)
                    if step % cfg.checkpoint_every == 0 or sig.signum is not None:
                        checkpoint()
                    if sig.signum is not None:
                        raise Interrupted(
                            sig.signum,
                            f"stopped by signal {sig.signum} at step {step}: checkpoint saved; "
                            f"continue with `mlsae train --resume {out}`",
                        )
                    if step >= total:
                        break
                    t0 = time.perf_counter()
                else:
                    epoch, batch_i = epoch + 1, 0
            checkpoint()
    finally:
        if wb is not None:
            wb.finish()
    el = time.perf_counter() - t_start
    if v_done:
        log.info(f"{step} steps; {v_done / el:.0f} vectors/s over this session")
    return members


def batches_per_epoch(run: RunConfig, source: ActivationSource) -> tuple[int, int]:
    """(vectors read per step, steps per epoch); MlsaeError if the source holds less than one
    batch of usable vectors."""
    per_read = len(run.layers) if run.mode == "per_layer" else 1
    read_batch = run.train.batch_tokens * per_read
    n_vec = source.n_vectors(run.layers)
    if n_vec == 0:
        raise MlsaeError(f"{source.describe()} holds no usable vectors (every token is special)")
    per_epoch = n_vec // read_batch
    if per_epoch == 0:
        raise MlsaeError(
            f"{source.describe()} holds {n_vec} vectors of layers {run.layers}, fewer than one "
            f"batch of {read_batch}: lower --batch-tokens or use more tokens"
        )
    return read_batch, per_epoch


def sae_inputs(
    run: RunConfig, source: ActivationSource, layers: list[int]
) -> Callable[[Batch], Tensor]:
    """Batch -> SAE inputs [B, d]: the stored vectors, or T_l of them when the run trains in
    tuned-lens space on model-space activations (SPEC 5)."""
    from mlsae.lens.tuned import resolve_space

    space = resolve_space(run.lens, source.lens, what="the run")
    lens = space.lens
    if lens is None or space.cache_in_lens:
        return lambda batch: batch.x
    if lens.d_model != source.d_model:
        raise MlsaeError(f"the lens has width {lens.d_model}, the activations {source.d_model}")
    lens.check_layers(layers)
    log.info(f"training in tuned-lens space: T_l applied on the fly ({run.lens})")
    return lambda batch: lens.forward_rows(batch.x, batch.layer)


def _member_x(m: Member, batch: Batch) -> Tensor:
    return batch.x if m.layer is None else batch.x[batch.layer == m.layer]


def _wandb_start(out: Path, run: RunConfig) -> Any:
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise MlsaeError("--wandb needs the wandb package (pip install wandb)") from None
    return wandb.init(
        project="mlsae", name=out.name, dir=str(out), config=run.to_dict(), resume="allow"
    )


# ----------------------------------------------------------------------------- after training


@torch.no_grad()
def final_fvu(run: RunConfig, members: list[Member], source: ActivationSource) -> dict[str, Any]:
    """Per-layer FVU (raw space) of each SAE on a pass over up to EVAL_VECTORS training vectors."""
    from mlsae.sae.metrics import LayerMetrics

    cfg, layers = run.train, list(run.layers)
    to_sae = sae_inputs(run, source, layers)
    acc = {m.name: LayerMetrics(m.sae.cfg.layers, m.sae.cfg.d_in, m.sae.cfg.d_sae) for m in members}
    seen = 0
    for batch in source.shuffled(
        8192, layers, seed=cfg.seed + 1, buffer_shards=cfg.shuffle_buffer_shards
    ):
        batch.x = to_sae(batch)
        for m in members:
            for layer in m.sae.cfg.layers:
                sel = batch.layer == layer
                if sel.any():
                    x = batch.x[sel]
                    x_hat, enc = m.sae(x)
                    acc[m.name].update(layer, x, x_hat, enc.top_indices, enc.top_acts)
        seen += len(batch)
        if seen >= EVAL_VECTORS:
            break
    return {name: a.result() for name, a in acc.items()}


def format_fvu(res: dict[str, Any]) -> str:
    """The final per-layer FVU of each SAE as text (final_fvu.json)."""
    lines = ["final per-layer FVU (training tokens):"]
    for name, r in res.items():
        per = " ".join(
            f"{ly}:{v:.3f}" if v is not None else f"{ly}:-"
            for ly, v in zip(r["layers"], r["per_layer"]["fvu"], strict=True)
        )  # fmt: skip
        mean = r["mean"]["fvu"]
        lines.append(f"  {name}: mean {mean:.4f} | {per}" if mean is not None else f"  {name}: -")
    return "\n".join(lines)


def train_command(
    out: Path,
    *,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
    sae: SaeGridConfig | None = None,
    train: TrainConfig | None = None,
    resume: bool = False,
    train_given: dict[str, Any] | None = None,
) -> Path:
    """`mlsae train`: a new run in `out`, or (resume) continue the run in `out` with its saved
    settings, except `train_given` (max_steps, epochs) which may be raised. Without
    `source.cache`, the activations of `source.tokens` tokens are cached into RUN/cache first
    (resumable). Every option, the output location and the memory needed are checked before the
    run folder is made; the folder is locked while the run writes it. Returns the run folder."""
    from mlsae.activations.cache import ActivationCache

    out = Path(out)
    if resume:
        if not out.is_dir():
            raise MlsaeError(f"--resume {out}: no such run folder")
        with folder_lock(out, "training run"):
            run = read_run(out, train_given, save=False)  # saved once the checkpoint loads
            if run.cache is None:
                raise MlsaeError(
                    f"{out}/{RUN_CFG} names no activation cache: the run cannot resume"
                )
            src: ActivationSource = ActivationCache(run.cache)
            check_training_memory(run, src)
            return _train(out, run, src)
    data, model = data or DataConfig(), model or ModelConfig()
    source, sae, train = source or SourceConfig(), sae or SaeGridConfig(), train or TrainConfig()
    check_new_run(out)
    check_output(out, "run", inputs=[source.cache, sae.lens])
    if sae.lens is not None:  # a bad lens fails before any work
        from mlsae.lens.tuned import load_lens

        load_lens(sae.lens)
    if source.cache is not None:
        src = ActivationCache(source.cache)
        run = plan_run(src, data, model, source, sae, train)
        batches_per_epoch(run, src)
        check_training_memory(run, src)
        check_writable(out, f"--out {out}", training_disk(run))
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out, "training run"):
            check_new_run(out)
            write_json(out / RUN_CFG, run.to_dict())
            return _train(out, run, src)
    from mlsae.activations.extract import build_cache, open_cache_source

    layers = str(sae.single_layer) if sae.single_layer is not None else source.layers
    cache_src = replace(source, tokens=source.tokens or 50_000, layers=layers)
    cache_data = replace(data, split="train")
    live = open_cache_source(model, cache_data, cache_src)
    run = plan_run(live, data, model, source, sae, train)  # every option checked
    batches_per_epoch(run, live)
    check_training_memory(run, live)
    check_writable(out, f"--out {out}", training_disk(run))
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "training run"):
        check_new_run(out)
        build_cache(out / "cache", model, cache_data, cache_src, live=live)
        src = ActivationCache(out / "cache")
        run = plan_run(src, data, model, source, sae, train)
        write_json(out / RUN_CFG, run.to_dict())
        return _train(out, run, src)


def _train(out: Path, run: RunConfig, src: ActivationSource) -> Path:
    """Train, then write per_layer.json (a per-layer set) and final_fvu.json."""
    members = run_training(out, run, src)
    if run.mode == "per_layer":
        entries = [{"layer": m.layer, "path": m.name} for m in members]
        write_json(out / PER_LAYER, {"layers": [m.layer for m in members], "saes": entries})
    res = final_fvu(run, members, src)
    write_json(out / "final_fvu.json", res)
    bad = [
        name
        for name, r in res.items()
        if r["mean"]["fvu"] is None
        or any(v is not None and not math.isfinite(v) for v in r["per_layer"]["fvu"])
    ]
    if bad:
        raise MlsaeError(f"training diverged: SAE(s) {bad} have a non-finite FVU; lower --lr")
    return out
