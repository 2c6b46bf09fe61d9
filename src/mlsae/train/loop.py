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

Exact resume: the data order is a pure function of (seed, epoch, batch index) (source.shuffled
with skip_batches; a cache or the live model stream, see mlsae.train.source), and checkpoints
hold all weights, Adam states, counters and the position. Several processes (torchrun) train
data-parallel with the same math as one (mlsae.train.parallel).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource, Batch
from mlsae.core.compute import resolve_compute_dtype, resolve_device
from mlsae.core.config import (
    DataConfig,
    ExtractConfig,
    ModelConfig,
    RunConfig,
    SaeConfig,
    SaeGridConfig,
    SourceConfig,
    TrainConfig,
)
from mlsae.core.dist import Comm
from mlsae.core.errors import Interrupted, MlsaeError
from mlsae.core.io import write_json
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import PER_LAYER, RUN_CFG
from mlsae.sae.kernels import kernel_backend, set_malloc_retain
from mlsae.train.checkpoint import StopSignals, load_checkpoint, open_metrics, save_checkpoint
from mlsae.train.member import SINGLE, Member, NonFinite, all_finite, make_adam, step_probe
from mlsae.train.outputs import final_fvu, format_fvu, log_rows, sae_inputs, wandb_start
from mlsae.train.parallel import plan_shares
from mlsae.train.run import save_run

__all__ = ["final_fvu", "format_fvu", "run_training", "train_command"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- run setup


# ----------------------------------------------------------------------------- the loop


def _compute_dtype(run: RunConfig, device: torch.device, comm: Comm) -> torch.dtype | None:
    """The run's compute dtype; `auto` on a CPU is measured by rank 0 alone (None elsewhere),
    timing the step of the run's largest SAE."""
    name = run.train.compute_dtype
    if not comm.main and name == "auto" and device.type == "cpu":
        return None
    big = max(run.members, key=lambda s: s.expansion_factor)
    shape = (run.d_in, run.d_in * big.expansion_factor)
    probe = step_probe(run.d_in, big.expansion_factor, big.k)
    return resolve_compute_dtype(name, verbose=comm.main, device=device, shape=shape, probe=probe)


def run_training(
    out: Path, run: RunConfig, source: ActivationSource, comm: Comm = SINGLE
) -> list[Member]:
    """Train (or continue) the run in `out` on `source`; returns the members with their final
    weights. With a `comm` of several processes, each reads its share of every global batch
    (`mlsae.train.parallel`) and rank 0 alone writes the checkpoints and metrics."""
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
    device = resolve_device(run.model.device)
    dtype = comm.broadcast_object(_compute_dtype(run, device, comm))  # every process alike
    set_malloc_retain(True)  # no page faults for each step's large temporaries
    kernel_backend()  # build/load the native kernels now; logs which backend runs
    members = []
    for s in run.members:
        sc = SaeConfig(
            d_in=run.d_in, expansion_factor=s.expansion_factor, k=s.k,
            normalize=run.sae.normalize, layers=list(s.layers), model=run.model.name,
            dataset=run.data.name, lens=run.lens, exclude_sink=run.data.exclude_sink,
        )  # fmt: skip
        sae = SparseAutoencoder(sc, seed=s.seed, compute_dtype=dtype, device=device)
        since = torch.zeros(sc.d_sae, dtype=torch.float64)
        layer = s.layers[0] if run.mode == "per_layer" else None
        members.append(
            Member(s.name, sae, make_adam(sae.parameters(), cfg, sc.d_sae), layer, since)
        )
        if comm.main:
            how = "--lr" if cfg.lr is not None else "default: 1e-3 x sqrt(4608 / d_sae)"
            log.info(
                f"{s.name}: learning rate {cfg.resolved_lr(sc.d_sae):.3g} ({how}, d_sae {sc.d_sae})"
            )
    per_read = len(layers) if run.mode == "per_layer" else 1
    read_batch = cfg.batch_tokens * per_read
    share, local_batch, per_epoch = plan_shares(source, layers, read_batch, comm)
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
    ck = comm.broadcast_object(load_checkpoint(out) if comm.main else None)
    if ck is not None:
        step, epoch, batch_i = ck["step"], ck["epoch"], ck["batch"]
        if int(ck.get("world", 1)) != comm.world:
            raise MlsaeError(f"{out} was trained on {ck.get('world', 1)} process(es): resume it "
                             f"with --nproc {ck.get('world', 1)} (the data order depends on it)")  # fmt: skip
        for m in members:
            if m.name not in ck["members"]:
                raise MlsaeError(f"checkpoint of {out} lacks SAE {m.name}: not this run's")
            m.load(ck["members"][m.name])
        if comm.main:
            log.info(f"resuming {out} at step {step} (epoch {epoch}, batch {batch_i}) with the "
                     f"settings of {RUN_CFG}")  # fmt: skip
    else:
        for m in members:  # one initialisation (the seeds already agree; as DDP does)
            for prm in m.sae.parameters():
                comm.broadcast_(prm.data)
    if comm.main:
        save_run(out, run)  # a resume's new --max-steps / --epochs / device hold from here on
    k_aux = cfg.resolved_k_aux(run.d_in)
    saved = [step]  # the step of the last checkpoint

    def checkpoint() -> None:
        bad = [m.name for m in members if not all_finite(m.sae.parameters())]
        if bad:  # never reached: the step checks first; a non-finite SAE is never saved
            raise MlsaeError(f"SAE(s) {bad} hold NaN or inf weights at step {step}: not saved")
        saved[0] = step
        if comm.main:
            state = {"step": step, "epoch": epoch, "batch": batch_i, "world": comm.world}
            save_checkpoint(out, {**state, "members": {m.name: m.state() for m in members}})
            for m in members:
                m.sae.save(out / m.name)

    metrics_log = open_metrics(out, step) if comm.main else contextlib.nullcontext()
    wb = wandb_start(out, run) if cfg.wandb and comm.main else None
    bar = tqdm(total=total, initial=step, unit="step", desc="train", dynamic_ncols=True,
               disable=not comm.main)  # fmt: skip
    t_start, v_done = time.perf_counter(), 0
    try:
        with StopSignals() as sig, bar, metrics_log:
            while step < total and epoch < cfg.epochs:
                if batch_i >= per_epoch:  # a checkpoint taken at the end of an epoch
                    epoch, batch_i = epoch + 1, 0
                    continue
                batches = share.shuffled(
                    local_batch, layers, seed=cfg.seed, epoch=epoch, skip_batches=batch_i,
                    buffer_shards=cfg.shuffle_buffer_shards, drop_last=True,
                )  # fmt: skip
                t0 = time.perf_counter()
                epoch_done = True
                for batch in batches:
                    batch.x = to_sae(batch)
                    if not all_finite([batch.x]):
                        raise MlsaeError(f"the vectors of step {step + 1} from "
                                         f"{source.describe()} hold NaN or inf")  # fmt: skip
                    rows, n_step = [], 0
                    for m in members:
                        x = _member_x(m, batch)
                        n = comm.count(len(x))
                        if n < 2:
                            continue
                        try:
                            rows.append({"sae": m.name, **m.step(x, cfg, k_aux, comm, n)})
                        except NonFinite as e:
                            raise MlsaeError(
                                f"training diverged at step {step + 1}: {e}; lower --lr (lr "
                                f"{m.opt.param_groups[0]['lr']:g}). Nothing of this step was saved; the run's last "
                                f"checkpoint (step {saved[0]}) holds finite weights"
                            ) from None
                        n_step += n
                    step, batch_i = step + 1, batch_i + 1
                    t1 = time.perf_counter()
                    vps = n_step / max(t1 - t0, 1e-9)
                    v_done += n_step
                    if comm.main:
                        log_rows(metrics_log, wb, rows, step, epoch, vps)
                    bar.set_postfix(
                        fvu=f"{rows[0]['fvu']:.3f}" if rows else "-", vec_s=f"{vps:.0f}"
                    )
                    bar.update(1)
                    stop = comm.any(sig.signum is not None)
                    if step % cfg.checkpoint_every == 0 or stop:
                        checkpoint()
                    if stop:
                        comm.barrier()  # the others wait until rank 0 has written it
                        signum = sig.signum or signal.SIGTERM
                        raise Interrupted(
                            signum,
                            f"stopped by signal {signum} at step {step}: checkpoint saved; "
                            f"continue with `mlsae train --resume {out}"
                            + (f" --nproc {comm.world}`" if comm.world > 1 else "`"),
                        )
                    if batch_i >= per_epoch:  # every process's share of the epoch is read
                        break
                    if step >= total:
                        epoch_done = False
                        break
                    t0 = time.perf_counter()
                if epoch_done:
                    epoch, batch_i = epoch + 1, 0
            checkpoint()
            comm.barrier()
    finally:
        if wb is not None:
            wb.finish()
    el = time.perf_counter() - t_start
    if v_done and comm.main:
        log.info(f"{step} steps; {v_done / el:.0f} vectors/s over this session")
    return members


def _member_x(m: Member, batch: Batch) -> Tensor:
    return batch.x if m.layer is None else batch.x[batch.layer == m.layer]


def train_command(
    out: Path,
    *,
    data: DataConfig | None = None,
    model: ModelConfig | None = None,
    source: SourceConfig | None = None,
    sae: SaeGridConfig | None = None,
    train: TrainConfig | None = None,
    stream: ExtractConfig | None = None,
    resume: bool = False,
    train_given: dict[str, Any] | None = None,
    device: str | None = None,
) -> Path:
    """`mlsae train`: a new run in `out`, or (resume) continue the run in `out` with its saved
    settings, except `train_given` (max_steps, epochs) which may be raised and `device`.
    Without `source.cache`, the model is run on `source.tokens` training tokens as the run goes
    (the live stream, blocks and dtype from `stream`; nothing is written outside `out`).
    Launched by torchrun with several processes, they train data-parallel
    (`mlsae.train.parallel`). Returns the run folder."""
    from mlsae.core.dist import first_line, session

    out = Path(out)
    name = device or (model.device if model is not None and not resume else None)
    with session(resolve_device(name) if name else None) as comm, contextlib.ExitStack() as lock:
        try:
            run, src = _open_run(out, comm, lock, data=data, model=model, source=source, sae=sae,
                                 train=train, stream=stream, resume=resume,
                                 train_given=train_given, device=device)  # fmt: skip
            members = run_training(out, run, src, comm)
        except RuntimeError as e:  # a collective failed: another process died or timed out
            if comm.world == 1:
                raise
            raise MlsaeError(
                f"rank {comm.rank} of {comm.world}: {first_line(e)} (another process of the "
                f"job failed or timed out); continue with `mlsae train --resume {out} "
                f"--nproc {comm.world}`"
            ) from None
        if not comm.main:
            return out
        _finish(out, run, members, src)
    return out


def _finish(out: Path, run: RunConfig, members: list[Member], src: ActivationSource) -> None:
    """per_layer.json (a per-layer set) and final_fvu.json, after training."""
    if run.mode == "per_layer":
        entries = [{"layer": m.layer, "path": m.name} for m in members]
        write_json(out / PER_LAYER, {"layers": [m.layer for m in members], "saes": entries})
    res = final_fvu(run, members, src)
    write_json(out / "final_fvu.json", res)
    if not math.isfinite(sum(r["mean"]["fvu"] or 0.0 for r in res.values())):
        raise MlsaeError("training diverged (non-finite FVU): lower --lr")


def _open_run(
    out: Path, comm: Comm, lock: contextlib.ExitStack, **kw: Any
) -> tuple[RunConfig, ActivationSource]:
    """Rank 0 prepares the run (`prepare_run`, which locks the folder on `lock`) and sends its
    RunConfig (or its error) to the others, which open the same activations."""
    from mlsae.train.source import open_run_source, prepare_run

    if comm.world == 1:
        return prepare_run(out, lock, **kw)
    if comm.main:
        try:
            run, src = prepare_run(out, lock, **kw)
        except MlsaeError as e:
            comm.broadcast_object({"error": str(e)})
            raise
        comm.broadcast_object(run.to_dict())
        return run, src
    got = comm.broadcast_object(None)
    if "error" in got:
        raise MlsaeError(f"rank 0: {got['error']}")
    run = RunConfig.from_dict(got, "rank 0's train_cfg.json")
    return run, open_run_source(run)
