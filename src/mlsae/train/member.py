"""One SAE being trained (`Member`: weights, Adam, dead-latent counter, one optimizer step with
its non-finite checks), shared by every kind of training run (train/loop.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlsae.core.config import SaeConfig, TrainConfig
from mlsae.core.dist import Comm
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.train.parallel import sum_grads

SINGLE = Comm()
"""The Comm of a single-process run (every collective is the identity)."""


def make_adam(params, cfg: TrainConfig, d_sae: int | None = None) -> torch.optim.Adam:
    """Adam (SPEC 2), the fused CPU kernel where this torch has one; the learning rate is
    cfg.resolved_lr(d_sae) (d_sae may be left out when cfg.lr is set)."""
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.lr is None and d_sae is None:
        raise ValueError("make_adam: the default learning rate needs d_sae")
    lr = cfg.resolved_lr(d_sae or 0)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - old torch
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps)


def step_probe(
    d_in: int, expansion_factor: int, k: int
) -> Callable[[torch.dtype, int], Callable[[], object]]:
    """For `--compute-dtype auto`'s calibration (`mlsae.core.calibrate`): (dtype, rows) -> one
    training step (forward, backward, Adam, decoder renorm) of an SAE of this shape on `rows`
    random vectors in that compute dtype."""

    def make(dtype: torch.dtype, rows: int) -> Callable[[], object]:
        cfg = SaeConfig(d_in=d_in, expansion_factor=expansion_factor, k=k)
        sae = SparseAutoencoder(cfg, compute_dtype=dtype)
        opt = make_adam(sae.parameters(), TrainConfig(), cfg.d_sae)
        x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(0))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            sae.train_step_forward(x).loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()

        return step

    return make


@dataclass
class Member:
    """One SAE being trained, with its optimizer and dead-latent counter."""

    name: str
    sae: SparseAutoencoder
    opt: torch.optim.Adam
    layer: int | None  # per-layer set: the layer it takes from each batch; else None (all)
    since: Tensor  # f64[d_sae] tokens since each latent last fired
    initialized: bool = False  # b_dec set from the first batch

    @property
    def tokens_per_vector(self) -> float:
        return 1.0 / len(self.sae.cfg.layers)

    def step(
        self,
        x: Tensor,
        cfg: TrainConfig,
        k_aux: int,
        comm: Comm = SINGLE,
        n: int | None = None,
        layer: Tensor | None = None,
    ) -> dict[str, float]:
        """One optimizer step on raw vectors x [B, d] (any device: moved to the SAE's); returns
        the step's metrics. Data-parallel (`comm` of several processes): x is this process's
        share of the global batch of n vectors, and the step is the global batch's (see
        `mlsae.train.parallel`). NonFinite if the loss or the updated weights are not finite.
        layer: each row's block (i64[B]), for per-layer centring."""
        sae, dist = self.sae, comm.world > 1
        n = len(x) if n is None else n
        x = x.to(sae.device)
        if not self.initialized:
            if dist:  # rank 0: the geometric median of the whole first global batch
                u = comm.gather_rows(sae.normalize(x, layer)[0].cpu())
                if comm.main:
                    sae.init_b_dec_from(u.to(sae.device))
                comm.broadcast_(sae.b_dec.data)
            else:
                sae.init_b_dec(x, layer)
            self.initialized = True
        dead = (self.since >= cfg.dead_tokens).nonzero().view(-1)  # [n_dead]
        self.opt.zero_grad(set_to_none=True)
        reduce = comm.sum_ if dist else None
        out = sae.train_step_forward(x, dead.to(sae.device), k_aux, cfg.aux_coef, reduce, layer)
        losses = torch.stack([out.loss, out.fvu, out.auxk]).detach().to("cpu", torch.float64)
        if not math.isfinite(float(losses[0])):
            raise NonFinite(f"the loss of SAE {self.name} is {float(losses[0])}")
        out.loss.backward()
        if dist:
            sum_grads(sae, comm)
        sae.remove_parallel_grad_()
        self.opt.step()
        sae.normalize_decoder_()
        if not all_finite(sae.parameters()):
            raise NonFinite(f"the weights of SAE {self.name} became NaN or inf")
        fired = update_dead_counter(
            self.since, out.top_acts, out.top_indices, n * self.tokens_per_vector, reduce
        )
        if dist:
            comm.sum_(losses)  # the shares of the global batch's losses
        return {
            "loss": float(losses[0]),
            "fvu": float(losses[1]),
            "auxk": float(losses[2]),
            "dead_frac": dead.numel() / sae.cfg.d_sae,
            "l0": fired,
        }

    def state(self) -> dict[str, Any]:
        return {
            "sae": {k: v.detach().clone() for k, v in self.sae.state_dict().items()},
            "opt": self.opt.state_dict(),
            "since": self.since.clone(),
            "initialized": self.initialized,
        }

    def load(self, st: dict[str, Any]) -> None:
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["opt"])
        self.since.copy_(st["since"])
        self.initialized = bool(st["initialized"])


class NonFinite(Exception):
    """A NaN or inf in a training step (caught by `run_training`, which names the step)."""


@torch.no_grad()
def all_finite(tensors: Any) -> bool:
    """Whether every tensor is free of NaN and inf: one float32 sum per tensor (a NaN or inf
    anywhere makes it non-finite; so does a sum beyond 3e38, which only diverged weights
    reach). About 1% of a training step for the default SAE."""
    return all(math.isfinite(float(t.detach().sum())) for t in tensors)


@torch.no_grad()
def update_dead_counter(
    since: Tensor,
    acts: Tensor,
    idx: Tensor,
    n_tokens: float,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Add n_tokens to every latent's counter (f64, on the CPU), reset the latents that fired
    (act > 0) to 0; returns L0 (mean number of active latents per vector). reduce (data-parallel
    training): acts/idx [B_r, k] are this process's share, n_tokens the global batch's; a latent
    fired if it fired on any process, L0 is the global batch's."""
    on = (acts > 0).cpu()  # [B, k]
    idx = idx.cpu()
    if reduce is None:
        since += n_tokens
        since.index_fill_(0, idx[on], 0.0)
        return float(on.sum()) / max(1, acts.shape[0])
    fired = torch.zeros(len(since) + 2, dtype=torch.float64)
    fired.index_fill_(0, idx[on], 1.0)
    fired[-2:] = torch.tensor([float(on.sum()), float(acts.shape[0])])
    reduce(fired)  # [d_sae] processes on which each latent fired, then (active, vectors)
    since += n_tokens
    since.masked_fill_(fired[:-2] > 0, 0.0)
    return float(fired[-2]) / max(1.0, float(fired[-1]))
