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
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from mlsae.activations.source import ActivationSource, Batch
from mlsae.core.compute import resolve_compute_dtype, resolve_device
from mlsae.core.config import (
    ExtractConfig,
    RunConfig,
    SaeConfig,
    SaeGridConfig,
    TrainConfig,
)
from mlsae.core.dist import Comm
from mlsae.core.errors import Interrupted, MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import write_json
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.folders import PER_LAYER, RUN_CFG
from mlsae.sae.kernels import kernel_backend, set_malloc_retain
from mlsae.sae.registry import sae_class
from mlsae.train.calibrate import calibrate_thresholds
from mlsae.train.centring import member_means, resolve_centring
from mlsae.train.checkpoint import Plan, StopSignals, TrainState
from mlsae.train.member import SINGLE, Member, NonFinite, all_finite, make_adam, step_probe
from mlsae.train.outputs import (
    Progress,
    final_fvu,
    format_fvu,
    read_final_fvu,
    sae_inputs,
    write_final_fvu,
)
from mlsae.train.parallel import plan_shares
from mlsae.train.run import save_run

__all__ = ["final_fvu", "format_fvu", "read_final_fvu", "run_training", "train_command"]

log = logging.getLogger(__name__)


def run_training(
    out: Path, run: RunConfig, source: ActivationSource, comm: Comm = SINGLE
) -> list[Member]:
    """Train (or continue) the run in `out` on `source`; returns the members with their final
    weights. With a `comm` of several processes, each reads its share of every global batch
    (`mlsae.train.parallel`) and rank 0 alone writes the checkpoints and metrics."""
    cfg = run.train
    check_source(run, source)
    to_sae = sae_inputs(run, source, list(run.layers))
    run, means = resolve_centring(out, run, source, to_sae, comm.main)
    batches = Batches.of(run, source, comm)
    state = TrainState(new_members(run, comm, means), world=comm.world)
    if state.load(out, comm, batches.plan):
        if comm.main:
            log.info(
                f"resuming {out} at step {state.step} (epoch {state.epoch}, batch "
                f"{state.batch}) with the settings of {RUN_CFG}"
            )
    else:
        for prm in (p for m in state.members for p in m.sae.parameters()):
            comm.broadcast_(prm.data)  # one initialisation (the seeds already agree; as DDP)
    if comm.main:
        save_run(out, run)  # a resume's new --max-steps / --epochs / device hold from here on
    k_aux = cfg.resolved_k_aux(run.d_in)
    with StopSignals() as sig, Progress(out, run, state.step, batches.plan.total, comm) as progress:
        for batch in batches.iterate(state):
            batch.x = to_sae(batch)
            rows, n_vectors = train_step(state, batch, cfg, k_aux, comm, source)
            state.advance()
            progress.step(rows, n_vectors, state.step, state.epoch)
            stop = comm.any(sig.signum is not None)
            if state.step % cfg.checkpoint_every == 0 or stop:
                save(out, run, state, source, comm)
            if stop:
                comm.barrier()  # the others wait until rank 0 has written it
                raise interrupted(out, state.step, sig.signum or signal.SIGTERM, comm.world)
        save(out, run, state, source, comm)
        comm.barrier()
        progress.summary(state.step)
    return state.members


def save(
    out: Path, run: RunConfig, state: TrainState, source: ActivationSource, comm: Comm
) -> None:
    """Checkpoint the run; rank 0, which writes the SAEs, first calibrates their inference
    thresholds (`mlsae.train.calibrate`)."""
    if comm.main:
        calibrate_thresholds(run, state.members, source)
    state.save(out, comm)


def train_step(
    state: TrainState,
    batch: Batch,
    cfg: TrainConfig,
    k_aux: int,
    comm: Comm,
    source: ActivationSource,
) -> tuple[list[dict[str, Any]], int]:
    """One optimizer step of every member on its vectors of `batch` (SAE inputs); returns one
    metrics row per member that trained and the number of vectors (all processes) trained on."""
    step = state.step + 1
    if not all_finite([batch.x]):
        raise MlsaeError(f"the vectors of step {step} from {source.describe()} hold NaN or inf")
    rows: list[dict[str, Any]] = []
    n_vectors = 0
    for m in state.members:
        sel = None if m.layer is None else batch.layer == m.layer
        x, layer = (batch.x, batch.layer) if sel is None else (batch.x[sel], batch.layer[sel])
        n = comm.count(len(x))
        if n < 2:
            continue
        try:
            rows.append({"sae": m.name, **m.step(x, cfg, k_aux, comm, n, layer)})
        except NonFinite as e:
            raise MlsaeError(
                f"training diverged at step {step}: {e}; lower --lr (lr "
                f"{m.opt.param_groups[0]['lr']:g}). Nothing of this step was saved; the run's last checkpoint (step {state.saved_step}) holds "
                "finite weights"
            ) from None
        n_vectors += n
    return rows, n_vectors


@dataclass
class Batches:
    """The run's global batches in their fixed order, from any position: this process's share
    of the source, `local_batch` vectors of it per step (`mlsae.train.parallel`)."""

    share: ActivationSource
    layers: list[int]
    local_batch: int
    plan: Plan
    seed: int
    buffer_shards: int
    group_tokens: bool
    """Whole tokens per batch (all their layers together): architectures that select over a
    token's layers (`SparseAutoencoder.token_grouped`)."""

    @classmethod
    def of(cls, run: RunConfig, source: ActivationSource, comm: Comm) -> Batches:
        cfg, layers = run.train, list(run.layers)
        per_read = len(layers) if run.mode == "per_layer" else 1
        share, local, per_epoch = plan_shares(source, layers, cfg.batch_tokens * per_read, comm)
        total = per_epoch * cfg.epochs
        total = min(total, cfg.max_steps) if cfg.max_steps else total
        plan = Plan(per_epoch=per_epoch, epochs=cfg.epochs, total=total)
        grouped = bool(sae_class(run.sae.architecture).token_grouped)
        if grouped and local % len(layers):  # each process's share: whole tokens
            raise MlsaeError(
                f"--architecture {run.sae.architecture} takes whole tokens: each of the "
                f"{comm.world} processes would read {local} vectors of a global batch, not a "
                f"multiple of the {len(layers)} layers (choose --batch-tokens a multiple of "
                f"{len(layers) * comm.world // per_read})"
            )
        return cls(share, layers, local, plan, cfg.seed, cfg.shuffle_buffer_shards, grouped)

    def iterate(self, state: TrainState) -> Iterator[Batch]:
        """The batches from `state`'s position to the end of the plan; the caller advances
        `state` after each (`TrainState.advance`), this moves it from epoch to epoch."""
        while state.step < self.plan.total:
            if state.batch >= self.plan.per_epoch:
                state.next_epoch()
            stream = self.share.shuffled(  # a generator: closed (its reader thread ended) below
                self.local_batch,
                self.layers,
                seed=self.seed,
                epoch=state.epoch,
                skip_batches=state.batch,
                buffer_shards=self.buffer_shards,
                drop_last=True,
                group_tokens=self.group_tokens,
            )
            with contextlib.closing(cast(Generator[Batch, None, None], stream)):
                for batch in stream:
                    yield batch
                    if state.batch >= self.plan.per_epoch or state.step >= self.plan.total:
                        break
                else:
                    raise MlsaeError(
                        f"{self.share.describe()} ended after {state.batch} of "
                        f"epoch {state.epoch}'s {self.plan.per_epoch} batches"
                    )


def check_source(run: RunConfig, source: ActivationSource) -> None:
    """MlsaeError unless `source` holds the run's layers, width and (resume) data."""
    if source.d_model != run.d_in:
        raise MlsaeError(
            f"mismatched d_in: the run's SAEs take d_in = {run.d_in} but {source.describe()} "
            f"holds d_model = {source.d_model}"
        )
    source.layer_positions(list(run.layers))  # every layer of the run must be in the source
    have = getattr(source, "fingerprint", None)
    if run.fingerprint is not None and have is not None and have != run.fingerprint:
        raise MlsaeError(
            f"{source.describe()} is not the data this run started on (its shards changed "
            f"since: fingerprint {have[:12]}, the run's {run.fingerprint[:12]}): resume needs "
            "that cache; train a new run with --out instead"
        )


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


def new_members(run: RunConfig, comm: Comm, means: torch.Tensor | None = None) -> list[Member]:
    """The run's SAEs freshly initialised from their seeds, each with Adam and a zero counter;
    `means` [L, d] (rows in run.layers order): the block means of per-layer centring."""
    device = resolve_device(run.model.device)
    dtype = comm.broadcast_object(_compute_dtype(run, device, comm))  # every process alike
    set_malloc_retain(True)  # no page faults for each step's large temporaries
    kernel_backend()  # build/load the native kernels now; logs which backend runs
    members = []
    for s in run.members:
        sc = SaeConfig(
            d_in=run.d_in,
            expansion_factor=s.expansion_factor,
            k=s.k,
            normalize=run.sae.normalize,
            layers=list(s.layers),
            model=run.model.name,
            dataset=run.data.name,
            lens=run.lens,
            exclude_sink=run.data.exclude_sink,
            center_layers=run.sae.center_layers == "on",
            **run.sae.architecture_settings(),
        )
        sae = SparseAutoencoder(sc, seed=s.seed, compute_dtype=dtype, device=device)
        if means is not None:
            sae.get_buffer("layer_means").copy_(
                member_means(means, list(run.layers), list(s.layers))
            )
        since = torch.zeros(sc.d_sae, dtype=torch.float64)
        layer = s.layers[0] if run.mode == "per_layer" else None
        adam = make_adam(sae.parameters(), run.train, sc.d_sae)
        members.append(Member(s.name, sae, adam, layer, since))
        if comm.main:
            how = "--lr" if run.train.lr is not None else "default: 1e-3 x sqrt(4608 / d_sae)"
            lr = run.train.resolved_lr(sc.d_sae)
            log.info(f"{s.name}: learning rate {lr:.3g} ({how}, d_sae {sc.d_sae})")
    return members


def interrupted(out: Path, step: int, signum: int, world: int) -> Interrupted:
    nproc = f" --nproc {world}`" if world > 1 else "`"
    return Interrupted(
        signum,
        f"stopped by signal {signum} at step {step}: checkpoint saved; "
        f"continue with `mlsae train --resume {out}{nproc}",
    )


def train_command(
    out: Path,
    *,
    inputs: Inputs | None = None,
    sae: SaeGridConfig | None = None,
    train: TrainConfig | None = None,
    stream: ExtractConfig | None = None,
    resume: bool = False,
    train_given: dict[str, object] | None = None,
    device: str | None = None,
) -> Path:
    """`mlsae train`: a new run in `out`, or (resume) continue the run in `out` with its saved
    settings, except `train_given` (max_steps, epochs) which may be raised and `device`.
    Without `inputs.source.cache`, the model is run on `source.tokens` training tokens as the
    run goes
    (the live stream, blocks and dtype from `stream`; nothing is written outside `out`).
    Launched by torchrun with several processes, they train data-parallel
    (`mlsae.train.parallel`). Returns the run folder."""
    from mlsae.core.dist import first_line, session

    out = Path(out)
    name = device or (inputs.model.device if inputs is not None and not resume else None)
    with session(resolve_device(name) if name else None) as comm, contextlib.ExitStack() as lock:
        try:
            run, src = _open_run(
                out,
                comm,
                lock,
                inputs=inputs,
                sae=sae,
                train=train,
                stream=stream,
                resume=resume,
                train_given=train_given,
                device=device,
            )
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
    write_final_fvu(out / "final_fvu.json", res)
    if not math.isfinite(sum(r.mean["fvu"] or 0.0 for r in res.values())):
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
