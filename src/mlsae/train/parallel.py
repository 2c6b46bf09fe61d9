"""Data-parallel training over the processes of a torchrun job: what each process reads, and
what they exchange so that N processes compute exactly what one process would on the same
global batches (up to the order of floating-point sums).

- Data: process r of N reads blocks r, r + N, ... of the source (`rank_share`: a cache's
  shards, or the live stream's blocks, whose model forward only that process runs), shuffles
  them with the run's seed, and takes batches of B / N vectors; global batch s is the
  concatenation, in rank order, of the processes' batches s. An epoch is as many steps as the
  process with the fewest vectors can fill. The data order therefore depends on N, and a run
  resumes with the same N (the checkpoint records it).
- Loss: the FVU of the global batch, not the mean of per-process FVUs. Its denominator (the
  batch's total variance about its per-dimension mean) does not depend on the parameters, so
  each process computes its numerator over its rows divided by the global denominator
  (`mlsae.sae.metrics.fvu` with `reduce`), and the summed gradients are the global batch's.
  AuxK likewise (the dead latents agree: the counters do).
- Gradients are summed over the processes (`sum_grads`) before the decoder-gradient projection
  and Adam, so every process applies the same update to the same weights.
- Dead latents: a latent fired in a step if it fired on any process; every counter advances by
  the global batch's tokens (`update_dead_counter` with `reduce`).
- b_dec: rank 0 sets it to the geometric median of the whole first global batch (gathered from
  every process, in rank order) and broadcasts it; the initial weights are broadcast too.
- Rank 0 alone reads and writes the run folder (train_cfg.json, checkpoints, metrics, SAEs);
  the others receive the configuration and checkpoint from it, so nodes need no shared disk
  (a cache must exist at the same path on every node; the live stream needs none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mlsae.activations.source import ActivationSource
from mlsae.activations.subset import rank_share
from mlsae.core.dist import Comm
from mlsae.core.errors import MlsaeError


def plan_shares(
    source: ActivationSource, layers: Sequence[int], read_batch: int, comm: Comm
) -> tuple[ActivationSource, int, int]:
    """(this process's share of the source, its vectors per step, steps per epoch) for global
    batches of `read_batch` vectors."""
    if read_batch % comm.world:
        raise MlsaeError(
            f"a global batch of {read_batch} vectors does not split evenly over "
            f"{comm.world} processes: choose --batch-tokens accordingly"
        )
    local = read_batch // comm.world
    share = rank_share(source, comm.rank, comm.world)
    n_vec = share.n_vectors(layers)
    n_all = comm.count(n_vec)
    if n_all == 0:
        raise MlsaeError(f"{source.describe()} holds no usable vectors (every token is special)")
    per_epoch = -int(comm.max_(torch.tensor([-(n_vec // local)], dtype=torch.int64)))  # min
    if per_epoch == 0:
        raise MlsaeError(
            f"{source.describe()} holds {n_all} vectors of layers {list(layers)}, fewer than one "
            f"batch of {read_batch}{' per process' if comm.world > 1 else ''}: lower "
            "--batch-tokens or use more tokens"
        )
    return share, local, per_epoch


@torch.no_grad()
def sum_grads(module: nn.Module, comm: Comm) -> None:
    """Every parameter's gradient summed over the processes (one flat all-reduce; a parameter
    without a gradient counts as zeros)."""
    params = list(module.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.sum_(flat)
    for p, piece in zip(params, flat.split([g.numel() for g in grads]), strict=True):
        if p.grad is None:
            p.grad = piece.view_as(p).clone()
        else:
            p.grad.copy_(piece.view_as(p))
