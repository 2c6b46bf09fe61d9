"""One SAE being trained (`Member`: weights, Adam, dead-latent counter, one optimizer step with
its non-finite checks), shared by every kind of training run (train/loop.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlsae.core.config import TrainConfig
from mlsae.sae.autoencoder import SparseAutoencoder


def make_adam(params, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam (SPEC 2), the fused CPU kernel where this torch has one."""
    betas = (cfg.betas[0], cfg.betas[1])
    try:
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - old torch
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps)


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

    def step(self, x: Tensor, cfg: TrainConfig, k_aux: int) -> dict[str, float]:
        """One optimizer step on raw vectors x [B, d]; returns the step's metrics."""
        sae = self.sae
        if not self.initialized:
            sae.init_b_dec(x)
            self.initialized = True
        dead = (self.since >= cfg.dead_tokens).nonzero().view(-1)  # [n_dead]
        self.opt.zero_grad(set_to_none=True)
        out = sae.train_step_forward(x, dead, k_aux, cfg.aux_coef)
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise NonFinite(f"the loss of SAE {self.name} is {loss}")
        out.loss.backward()
        sae.remove_parallel_grad_()
        self.opt.step()
        sae.normalize_decoder_()
        if not all_finite(sae.parameters()):
            raise NonFinite(f"the weights of SAE {self.name} became NaN or inf")
        fired = update_dead_counter(
            self.since, out.top_acts, out.top_indices, len(x) * self.tokens_per_vector
        )
        return {
            "loss": loss,
            "fvu": out.fvu.item(),
            "auxk": out.auxk.item(),
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
def update_dead_counter(since: Tensor, acts: Tensor, idx: Tensor, n_tokens: float) -> float:
    """Add n_tokens to every latent's counter, reset the latents that fired (act > 0) to 0;
    returns L0 (mean number of active latents per vector)."""
    on = acts > 0  # [B, k]
    since += n_tokens
    since.index_fill_(0, idx[on], 0.0)
    return float(on.sum()) / max(1, acts.shape[0])
