"""Training the tuned lens (SPEC section 5; `mlsae lens train`).

The loss, summed over the lens's blocks l (all but the last), is the mean over used
(non-special) positions of KL(p_final || softmax(unembed(final_norm(T_l(x_l))))). All block
outputs come from one `capture.capture` pass that runs through the last block; the final
distribution is unembed(final_norm(x_{L-1})) of that same pass, which is exactly the model's
own logits.

Every KL step costs two [tokens, d] x [d, vocab] matmuls per layer (the full-vocabulary
unembedding), so on a CPU only a few thousand token-layers per minute are affordable. Hence
two stages:
1. warm start (`init="regression"`, default): each T_l is set to the weighted least-squares
   affine map from x_l to x_{L-1} (`regression_init`; Din et al. 2023). It needs only forward
   passes, so it can use many tokens, and already beats the logit lens by far. No floor on the
   singular values of I + A_l unless asked (`min_singular`).
   `init="zero"` starts from the identity (A = 0, c = 0) as Belrose et al. do.
2. KL training (`train_lens`): Adam on the KL loss in standardised coordinates
   (`_Preconditioned`), short warmup, linear decay to 0 over the maximum budget, stopped early
   when the KL on held-out training-split contexts stops improving; each block keeps its
   translator of lowest held-out KL (heldout.py). With `min_singular` the floor is kept
   through these steps too: after every optimizer step each translator is projected
   (`floor_singular_values`), so cond(I + A) <= max singular value / floor throughout. The
   final norm ignores a translator's overall scale, and the warm start's largest singular
   values reach hundreds (the residual norm grows ~20x over the blocks), so an absolute floor
   bounds cond(I + A) only loosely; `max_cond` bounds it directly (`cap_condition`).

Evaluation against the logit lens: evaluate.py.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.data.capture import get_final_norm, unembed
from mlsae.lens.heldout import CHUNK, HeldOut, LensTrainLog, capture_lens_layers, final_logits
from mlsae.lens.tuned import TunedLens

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "CHUNK",
    "capture_lens_layers",
    "final_logits",
    "cap_condition",
    "floor_singular_values",
    "regression_init",
    "train_lens",
]

log = logging.getLogger(__name__)


@contextmanager
def _frozen(model: PreTrainedModel) -> Iterator[None]:
    """No gradients into the model (the unembedding weight grad would dominate the cost)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _kl_backward(
    model: PreTrainedModel,
    translate: Callable[[Tensor], Tensor],
    h: Tensor,
    p: Tensor,
    p_logp: Tensor,
    scale: float,
) -> float:
    """Backpropagate scale * sum_t KL(p_t || q_t), q = softmax(unembed(final_norm(translate(h)))).

    h: [N, d] block outputs; p: [N, V] final probabilities; p_logp: sum p log p (scalar).
    The gradient through the softmax is the closed form q - p (two vocab matmuls, no autograd
    over [N, V] elementwise ops). Returns the loss value."""
    norm = get_final_norm(model)
    dtype = next(norm.parameters(), h).dtype
    u = norm(translate(h).to(dtype))  # [N, d] graph into the translator
    u_leaf = u.detach().requires_grad_(True)
    z = unembed(model, u_leaf).float()  # [N, V] graph into u_leaf only (model frozen)
    with torch.no_grad():
        logq = torch.log_softmax(z, dim=-1)
        kl = float(p_logp - (p * logq).sum()) * scale
        grad = logq.exp_().sub_(p).mul_(scale)  # d KL / d z = q - p
    z.backward(grad)
    u.backward(u_leaf.grad)
    return kl


class _Preconditioned(nn.Module):
    """Training parametrisation of one translator in standardised coordinates
    u = (h - mu) / s (mu, s: per-dimension mean and std of x_l on the first batches):
    T(h) = h + s * (B u + e), i.e. A = diag(s) B diag(1/s) and c = s * e - A mu. Residual
    streams have a few dimensions thousands of times larger than the rest; in these
    coordinates every entry of B has the same relative effect per Adam step, so one learning
    rate suits every dimension. Starts from the lens's current A, c."""

    mu: Tensor  # [d] buffer
    s: Tensor  # [d] buffer

    def __init__(self, x: Tensor, a: Tensor, c: Tensor) -> None:
        super().__init__()
        x = x.detach().float()  # [N, d]
        rms = x.pow(2).mean().sqrt().clamp_min(1e-6)
        many = len(x) > 1
        self.register_buffer("mu", x.mean(0) if many else torch.zeros(x.shape[1]))
        std = x.std(0) if many else torch.ones(x.shape[1]) * rms
        self.register_buffer("s", std.clamp_min(1e-3 * rms))  # [d]
        a, c = a.detach().float(), c.detach().float()
        self.B = nn.Parameter(a * self.s[None, :] / self.s[:, None])  # [d, d]
        self.e = nn.Parameter((c + a @ self.mu) / self.s)  # [d]

    def affine(self) -> tuple[Tensor, Tensor]:
        """(A [d, d], c [d]) of the current parameters."""
        a = self.s[:, None] * self.B / self.s[None, :]
        return a, self.s * self.e - a @ self.mu

    @torch.no_grad()
    def project_(self, min_singular: float | None, max_cond: float | None) -> bool:
        """Project in place so that I + A has no singular value below `min_singular` and a
        condition number <= `max_cond` (`condition_translator`), keeping c (the lens's offset)
        unchanged; returns whether anything changed."""
        a, c = self.affine()
        floored = condition_translator(a, min_singular, max_cond)
        if floored is None:
            return False
        a = floored.float()
        self.B.copy_(a * self.s[None, :] / self.s[:, None])
        self.e.copy_((c + a @ self.mu) / self.s)
        return True

    def forward(self, h: Tensor) -> Tensor:
        hf = h.float()  # [N, d]
        return hf + self.s * (((hf - self.mu) / self.s) @ self.B.T + self.e)


@torch.no_grad()
def floor_singular_values(a: Tensor, floor: float) -> Tensor | None:
    """A' with the singular values of I + A' those of I + A raised to at least `floor` (the
    same singular vectors; the nearest such matrix in Frobenius norm), in float64; None when
    I + A has no singular value below floor x (1 - 1e-6). a: [d, d].

    The check is a Cholesky factorisation of M^T M - (floor (1 - 1e-6))^2 I (M = I + A), which
    exists iff every singular value of M is above that: far cheaper than the SVD, which only
    runs when the floor binds."""
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    m = eye + a.detach().double()
    _, info = torch.linalg.cholesky_ex(m.T @ m - (floor * (1 - 1e-6)) ** 2 * eye)
    if int(info) == 0:
        return None
    u, sv, vh = torch.linalg.svd(m)
    return (u * sv.clamp_min(floor)) @ vh - eye


@torch.no_grad()
def cap_condition(a: Tensor, max_cond: float) -> Tensor | None:
    """A' with the singular values of I + A' those of I + A raised to at least (largest /
    max_cond), so cond(I + A') <= max_cond (same singular vectors; nearest in Frobenius norm
    among matrices with that floor), in float64; None when cond(I + A) is already within it."""
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    u, sv, vh = torch.linalg.svd(eye + a.detach().double())
    floor = float(sv.max()) / max_cond
    if float(sv.min()) >= floor * (1 - 1e-9):
        return None
    return (u * sv.clamp_min(floor)) @ vh - eye


def condition_translator(
    a: Tensor, min_singular: float | None, max_cond: float | None
) -> Tensor | None:
    """`floor_singular_values` then `cap_condition` (each when given); None if neither
    changed A."""
    floored = floor_singular_values(a, min_singular) if min_singular else None
    capped = cap_condition(a if floored is None else floored, max_cond) if max_cond else None
    return floored if capped is None else capped


@torch.no_grad()
def regression_init(
    model: PreTrainedModel,
    lens: TunedLens,
    batches: Iterable[Tensor],
    special_ids: Sequence[int],
    ridge: float = 0.01,
    min_singular: float | None = None,
    progress: bool = True,
    max_cond: float | None = None,
) -> int:
    """Warm start: set each trained translator to the weighted least-squares affine map from
    x_l to the last block's output x_{L-1} (Din et al. 2023, "Jump to conclusions"), i.e.
    min sum_t ||T_l(x_l) - x_{L-1}||^2 / rms(x_{L-1})^2 (the final norm divides by that RMS),
    ridge-regularised by `ridge` x the Gram diagonal. Only forward passes: cheap next to KL
    steps. batches: [B, T] ids. Returns the number of positions used.

    The fit squashes directions the final output does not vary in (singular values of I + A
    down to 1e-4), which the exact inverse amplifies up to ~1e4-fold. With `min_singular`,
    singular values below it are raised to it (then c is refit), which bounds ||(I + A)^-1|| by
    1 / min_singular at a cost in lens KL (see core.stage_config.SUGGESTED_MIN_SINGULAR); None or 0: no floor.
    With `max_cond`, singular values below the largest / max_cond are raised too
    (`cap_condition`), which bounds cond(I + A)."""
    trained = lens.trained_layers
    d = lens.d_model
    gram = {layer: torch.zeros(d + 1, d + 1, dtype=torch.float64) for layer in trained}
    rhs = {layer: torch.zeros(d + 1, d, dtype=torch.float64) for layer in trained}
    n = 0
    for ids in tqdm(batches, desc="lens regression", disable=not progress, file=sys.stderr):
        xs, mask, layers = capture_lens_layers(model, lens, ids, special_ids)
        x = xs[mask].double()  # [N, Lc, d]
        if not len(x):
            continue
        y = x[:, -1]  # [N, d] last block output
        w = 1 / y.pow(2).mean(1, keepdim=True).clamp_min(1e-12)  # [N, 1] token weights
        one = torch.ones(len(x), 1, dtype=torch.float64)
        for layer in trained:
            xl = torch.cat([x[:, layers.index(layer)], one], 1)  # [N, d+1]
            gram[layer] += (xl * w).T @ xl
            rhs[layer] += (xl * w).T @ (y - xl[:, :d])  # residual target: T(h) - h
        n += len(x)
    if n == 0:
        raise MlsaeError("no training positions for the lens regression")
    for layer in trained:
        g = gram[layer] + torch.diag(ridge * gram[layer].diagonal() + 1e-12)
        beta = torch.linalg.solve(g, rhs[layer])  # [d+1, d]
        a, c = beta[:d].T, beta[d]  # A [d, d], c [d]
        floored = condition_translator(a, min_singular, max_cond)
        if floored is not None:
            a = floored
            sw, swx = gram[layer][d, d], gram[layer][d, :d]  # sum w, sum w x
            c = (rhs[layer][d] - a @ swx) / sw  # weighted mean of y - x - A x
        lens._set(layer, a, c)
    return n


class _Batches:
    """Batches of `size` contexts cycling through `contexts` in shuffled order (a fresh
    permutation, drawn from `gen`, whenever the current one runs out)."""

    def __init__(self, contexts: Tensor, size: int, gen: torch.Generator) -> None:
        self.contexts, self.size, self.gen = contexts, size, gen
        self.order: Iterator[int] = iter(())

    def next(self) -> Tensor:
        n = len(self.contexts)
        idx = list(itertools.islice(self.order, self.size))
        while len(idx) < min(self.size, n):
            self.order = iter(torch.randperm(n, generator=self.gen).tolist())
            idx += list(itertools.islice(self.order, self.size - len(idx)))
        return self.contexts[idx]


def train_lens(
    model: PreTrainedModel,
    lens: TunedLens,
    contexts: Tensor,
    special_ids: Sequence[int],
    *,
    steps: int | None = None,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup: int | None = None,
    seed: int = 0,
    stat_contexts: int = 8,
    progress: bool = True,
    holdout: Tensor | None = None,
    eval_every: int = 10,
    patience: int = 3,
    min_singular: float | None = None,
    max_cond: float | None = None,
) -> LensTrainLog:
    """Train `lens` in place on `contexts` [n, T] (cycled in shuffled order), Adam with linear
    warmup and linear decay to 0 over `steps`. With `holdout` [m, T] contexts (never trained
    on), the held-out KL is measured before the first step and every `eval_every` steps; each
    block ends with its translator of lowest held-out KL (possibly the warm start) and training
    stops after `patience` evaluations without any block improving. Without `holdout`, all
    `steps` run and the last translators are kept. With `min_singular` (> 0) every translator
    is projected after every step (and before the first) so that I + A keeps its singular
    values >= min_singular (projected gradient descent; `floor_singular_values`); with
    `max_cond`, so that cond(I + A) <= max_cond (`cap_condition`)."""
    trained = lens.trained_layers
    if not trained:
        raise MlsaeError("nothing to train: the lens only covers the last block (identity)")
    if contexts.ndim != 2 or len(contexts) == 0:
        raise MlsaeError("no training contexts")
    steps = steps if steps is not None else math.ceil(len(contexts) / batch_size)
    warmup = warmup if warmup is not None else max(1, min(20, steps // 10))
    batches = _Batches(contexts, batch_size, torch.Generator().manual_seed(seed))
    out = LensTrainLog(stop_reason=f"max steps ({steps})")
    with _frozen(model):
        first = [batches.next() for _ in range(max(1, math.ceil(stat_contexts / batch_size)))]
        stats = [capture_lens_layers(model, lens, ids, special_ids) for ids in first]
        pre = _preconditioned(lens, stats)
        floor = _Floor(pre, min_singular, max_cond, out)
        floor.apply()
        opt, sched = _optimizer(pre, lr, warmup, steps)
        tracker = None
        if holdout is not None and len(holdout):
            tracker = HeldOut(model, lens, holdout, special_ids, patience)
            tracker.evaluate(model, 0, pre, out)
        bar = tqdm(range(1, steps + 1), desc="lens train", disable=not progress, file=sys.stderr)
        for step in bar:
            xs, mask, layers = (
                stats.pop(0)
                if stats
                else capture_lens_layers(model, lens, batches.next(), special_ids)
            )
            x = xs[mask]  # [N, Lc, d]
            total = _kl_backward_all(model, pre, x, layers)
            if len(x):
                opt.step()
                floor.apply()
                out.history.append(total / len(trained))
                bar.set_postfix(kl=f"{out.history[-1]:.3f}")
            opt.zero_grad(set_to_none=True)
            sched.step()
            check = step % eval_every == 0 or step == steps
            if tracker is not None and check and tracker.evaluate(model, step, pre, out):
                out.stop_reason = (
                    f"held-out KL of no block improved in {patience} evaluations "
                    f"({patience * eval_every} steps)"
                )
                break
    with torch.no_grad():
        for layer, m in pre.items():
            a, c = m.affine() if tracker is None else tracker.best[layer][2:]
            lens._set(layer, a, c)
    return out


def _optimizer(
    pre: dict[int, _Preconditioned], lr: float, warmup: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over every translator's parameters, with linear warmup over `warmup` steps and
    linear decay to 0 at `steps`."""
    opt = torch.optim.Adam(
        [q for m in pre.values() for q in m.parameters()], lr=lr, betas=(0.9, 0.999)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * max(0.0, 1 - i / steps)
    )
    return opt, sched


class _Floor:
    """Keeps every translator's singular values of I + A >= `floor` and its condition number
    <= `max_cond` (no-op for None / 0), counting the projections that changed a translator in
    `log.floor_projections`."""

    def __init__(
        self,
        pre: dict[int, _Preconditioned],
        floor: float | None,
        max_cond: float | None,
        log: LensTrainLog,
    ) -> None:
        self.pre, self.floor, self.max_cond, self.log = pre, floor, max_cond, log

    def apply(self) -> None:
        if not self.floor and not self.max_cond:
            return
        for m in self.pre.values():
            self.log.floor_projections += int(m.project_(self.floor, self.max_cond))


def _preconditioned(
    lens: TunedLens, stats: list[tuple[Tensor, Tensor, list[int]]]
) -> dict[int, _Preconditioned]:
    """Each trained block's translator in standardised coordinates, from the statistics of the
    first batches' positions (`capture_lens_layers` outputs)."""
    layers = stats[0][2]
    x0 = torch.cat([xs[mask] for xs, mask, _ in stats])  # [N, Lc, d]
    if len(x0) < 2:
        raise MlsaeError("too few training positions for the lens statistics")
    return {
        layer: _Preconditioned(x0[:, layers.index(layer)], lens.A(layer), lens.c(layer))
        for layer in lens.trained_layers
    }


def _kl_backward_all(
    model: PreTrainedModel, pre: dict[int, _Preconditioned], x: Tensor, layers: list[int]
) -> float:
    """Accumulate every translator's gradient of its mean KL(final || lens) over the positions
    x [N, Lc, d] (in chunks of CHUNK); returns the KL summed over the blocks."""
    total = 0.0
    for start in range(0, len(x), CHUNK):
        xc = x[start : start + CHUNK]  # [n, Lc, d]
        with torch.no_grad():
            final_logp = torch.log_softmax(final_logits(model, xc[:, -1]), dim=-1)
            p = final_logp.exp()  # [n, V]
            p_logp = (p * final_logp).sum()
            del final_logp
        for layer, m in pre.items():
            h = xc[:, layers.index(layer)]
            total += _kl_backward(model, m, h, p, p_logp, 1 / len(x))
    return total
