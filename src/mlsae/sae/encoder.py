"""The TopK encoder with a sparse backward: `topk_encode` (pre-activations, top-k, ReLU).

Only the k selected pre-activations per row carry gradient, so grad W_enc = v^T @ sparse(grad
pre) is a segment sum (`mlsae.sae.kernels.segment_sum`). AuxK reuses the same matmul: the dead
latents' columns are gathered in the top-k pass (no second encoder pass); their gradient is a
dense product over those columns, or, with many dead latents, k_aux sparse entries per row
(AUX_SPARSE_RATIO). The native backend runs the matmul in row tiles of at most TILE_BYTES and
takes each tile's top-k right after it; other devices take `plain_encode`, the same math in
plain torch ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mlsae.sae.kernels as kernels
import mlsae.sae.native as native
from mlsae.sae.kernels import custom_path, latent_segments, segment_sum, topk

TILE_BYTES = 128 << 20
"""Native backend: most bytes of one row tile of pre-activations (bounds the memory). Small,
cache-sized tiles did not pay on an AVX2 EPYC: MKL repacks W_enc for every tile, which cost
more than the top-k saved (training step with 4 / 16 / 128 MiB tiles: 441 / 388 / 365 ms)."""


class Encoded(NamedTuple):
    """Output of `topk_encode` (acts are post-ReLU, >= 0)."""

    acts: Tensor  # f32[N, k]
    idx: Tensor  # i64[N, k]
    dead_pre: Tensor  # f32[N, c] pre-activations of dead latents (AuxK), or [N, 0]
    dead_idx: Tensor  # i64[N, c] their latents, row by row (with k_aux), or [N, 0]: all dead


AUX_SPARSE_RATIO = 5
"""AuxK goes sparse (each row's k_aux largest dead pre-activations as extra sparse entries)
beyond this many dead latents per k_aux; below, a dense product over the dead columns is
faster. `bench/train_step.py --aux-sweep` on a 2-core AVX2 EPYC (N 4,096, d 576, m 4,608,
k_aux 256), best ms dense / sparse: 230 dead 234 / 333, 460 dead 276 / 437, 921 dead 402 / 462,
1,843 dead 578 / 406 (the dense cost grows with the dead latents, the sparse one with k_aux)."""


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, b_dec, W_enc, b_enc, k, dtype, dead, k_aux):  # noqa: N803
        v = u - b_dec  # [N, d] f32
        if dead is None:
            dead = torch.zeros(0, dtype=torch.int64)
        so = native.active()
        if so is not None:
            vals, idx, dead_pre = _encode_tiled(v, W_enc, b_enc, k, dtype, dead, so)
        else:
            pre = torch.addmm(b_enc.to(dtype), v.to(dtype), W_enc.to(dtype))  # [N, m]
            vals, idx = topk(pre, k)
            dead_pre = pre.index_select(1, dead).float()  # [N, n_dead]: only the dead columns
            del pre
        acts = vals.float().relu_()
        dead_idx = idx.new_zeros(idx.shape[0], 0)
        if k_aux and dead.numel():  # sparse AuxK: per row, the k_aux largest dead columns
            dead_pre, j = topk(dead_pre, min(k_aux, dead.numel()))
            dead_idx = dead[j]  # [N, k_aux] latents
        ctx.save_for_backward(v, W_enc, idx, acts, dead, dead_idx)
        ctx.mark_non_differentiable(idx, dead_idx)
        return acts, idx, dead_pre, dead_idx

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return (*_sparse_backward(ctx, *grads), None, None, None, None)


def _sparse_backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """Gradients (u, b_dec, W_enc, b_enc) of an encoder whose forward saved (v, W_enc, idx, acts,
    dead, dead_idx): only the selected entries of each row (any width; padding has act 0)."""
    g_acts, _g_idx, g_dead, _g_dead_idx = grads
    v, W_enc, idx, acts, dead, dead_idx = ctx.saved_tensors  # noqa: N806
    d, m = W_enc.shape
    g = (g_acts if g_acts is not None else torch.zeros_like(acts)) * (acts > 0)  # ReLU
    if g_dead is not None and dead_idx.shape[1]:  # sparse AuxK: more entries, same sums
        idx, g = torch.cat([idx, dead_idx], 1), torch.cat([g, g_dead.to(g.dtype)], 1)
    if kernels.dense_pays(idx.shape[1], m, d):
        return _dense_backward(ctx, v, W_enc, idx, g, dead, g_dead, dead_idx)
    seg = latent_segments(idx, m)
    dense = g_dead is not None and dead.numel() > 0 and not dead_idx.shape[1]
    g_u = g_bdec = g_w = None
    if ctx.needs_input_grad[2]:
        # [d, m] in W_enc's own layout: only active latents' columns are non-zero
        g_w, col = segment_sum(seg, v, g, transposed=True)
        if g_dead is not None and dense:
            g_w.index_add_(1, dead, v.t() @ g_dead)  # [d, n_dead]
    else:
        col = torch.zeros(m, dtype=g.dtype).index_add_(0, seg.flat, g.reshape(-1))  # [m]
    if g_dead is not None and dense:
        col.index_add_(0, dead, g_dead.sum(0))
    if ctx.needs_input_grad[1]:
        g_bdec = -(W_enc @ col)  # [d]: pre depends on -b_dec through every row
    if ctx.needs_input_grad[0]:
        g_u = F.embedding_bag(idx, W_enc.t().contiguous(), mode="sum", per_sample_weights=g)
        if g_dead is not None and dense:
            g_u = g_u + g_dead @ W_enc.index_select(1, dead).t()
    g_benc = col if ctx.needs_input_grad[3] else None
    return g_u, g_bdec, g_w, g_benc


def _dense_backward(ctx, v, W_enc, idx, g, dead, g_dead, dead_idx) -> tuple[Tensor | None, ...]:  # noqa: N803
    """`_sparse_backward` through the dense gradient of the pre-activations G [N, m] (the
    entries' gradients scattered, plus AuxK's dead columns): grad W_enc = v^T @ G, grad u = G @
    W_enc^T, as matmuls; for codes dense enough that they beat the segment sums
    (`kernels.dense_pays`)."""
    big = torch.zeros(len(v), W_enc.shape[1], dtype=g.dtype).scatter_add_(1, idx, g)
    if g_dead is not None and dead.numel() and not dead_idx.shape[1]:
        big.index_add_(1, dead, g_dead.to(g.dtype))
    col = big.sum(0)  # [m]
    g_u = big @ W_enc.t() if ctx.needs_input_grad[0] else None
    g_bdec = -(W_enc @ col) if ctx.needs_input_grad[1] else None
    g_w = v.t() @ big if ctx.needs_input_grad[2] else None
    return g_u, g_bdec, g_w, col if ctx.needs_input_grad[3] else None


_TILE: list[Tensor] = []  # the last tile buffer, kept between training steps


def _tile_buffer(rows: int, m: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised [rows, m] buffer, the same one from call to call while the shape holds:
    a fresh ~75 MB allocation per step was page-faulted in again (up to 15 ms a step here)."""
    if not _TILE or _TILE[0].shape != (rows, m) or _TILE[0].dtype != dtype:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of that mode
            _TILE[:] = [torch.empty(rows, m, dtype=dtype)]
    return _TILE[0]


def _encode_tiled(v, W_enc, b_enc, k, dtype, dead, so):  # noqa: N803
    """Native forward of the encoder: the matmul in row tiles, each tile's top-k (and dead
    columns, in the same pass over each row) -> (vals f32 [N, k], idx [N, k], dead_pre [N, n_dead])."""
    n, m = v.shape[0], W_enc.shape[1]
    vc, wc, bc = v.to(dtype), W_enc.to(dtype), b_enc.to(dtype)
    rows = max(1, min(n, TILE_BYTES // (m * wc.element_size())))
    buf = _tile_buffer(rows, m, dtype)
    vals, idx = torch.empty(n, k), torch.empty(n, k, dtype=torch.int64)
    dead_pre = torch.empty(n, dead.numel())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tile = torch.addmm(bc, vc[r0:r1], wc, out=buf[: r1 - r0])  # [rows, m]
        native.topk(tile, k, so, (vals[r0:r1], idx[r0:r1]), dead, dead_pre[r0:r1])
    return vals, idx, dead_pre


def topk_encode(
    u: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,  # noqa: N803
    b_enc: Tensor,
    k: int,
    dtype: torch.dtype = torch.float32,
    dead: Tensor | None = None,
    k_aux: int = 0,
) -> Encoded:
    """z = ReLU(TopK_k((u - b_dec) @ W_enc + b_enc)) as (acts, idx), the matmul in `dtype`
    (master weights stay f32). u f32[N, d], W_enc [d, m]. With `dead` (i64 latent ids), also
    the dead latents' pre-activations, sliced from the same matmul (for AuxK): all of them
    [N, n_dead] (dead_idx [N, 0]), or with k_aux > 0 each row's k_aux largest and their latents
    dead_idx [N, k_aux]. Gradients flow to u, b_dec, W_enc and b_enc through the selected
    entries (and the dead columns or the selected dead entries) only."""
    if not custom_path(W_enc):
        return plain_encode(u, b_dec, W_enc, b_enc, k, dtype, dead, k_aux)
    return Encoded(*_TopKEncode.apply(u, b_dec, W_enc, b_enc, k, dtype, dead, k_aux))


def plain_encode(
    u: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,  # noqa: N803
    b_enc: Tensor,
    k: int,
    dtype: torch.dtype = torch.float32,
    dead: Tensor | None = None,
    k_aux: int = 0,
) -> Encoded:
    """`topk_encode` in plain differentiable torch ops (autograd does the backward: the top-k
    scatters gradient to the selected entries only, as the custom kernel does)."""
    pre = torch.addmm(b_enc.to(dtype), (u - b_dec).to(dtype), W_enc.to(dtype))  # [N, m]
    vals, idx = pre.topk(k, dim=1, sorted=False)
    dead = dead if dead is not None else idx.new_zeros(0)
    dead_pre, dead_idx = pre.index_select(1, dead), idx.new_zeros(idx.shape[0], 0)
    if k_aux and dead.numel():
        dead_pre, j = dead_pre.topk(min(k_aux, dead.numel()), dim=1, sorted=False)
        dead_idx = dead[j]
    return Encoded(vals.float().relu(), idx, dead_pre.float(), dead_idx)


Select = Callable[[Tensor], tuple[Tensor, Tensor]]
"""A selection rule: pre-activations [N, m] -> (idx i64[N, w], keep bool[N, w]), the latents each
row keeps (padding: any latent with keep False). w may differ from call to call."""


class _SelectEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, b_dec, W_enc, b_enc, select, dtype, dead):  # noqa: N803
        v = u - b_dec  # [N, d] f32
        pre = torch.addmm(b_enc.to(dtype), v.to(dtype), W_enc.to(dtype))  # [N, m]
        idx, keep = select(pre)
        acts = pre.gather(1, idx).float().mul_(keep).relu_()
        dead_pre = pre.index_select(1, dead).float()  # [N, n_dead]
        del pre
        dead_idx = idx.new_zeros(idx.shape[0], 0)
        ctx.save_for_backward(v, W_enc, idx, acts, dead, dead_idx)
        ctx.mark_non_differentiable(idx, dead_idx)
        return acts, idx, dead_pre, dead_idx

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return (*_sparse_backward(ctx, *grads), None, None, None)


def select_encode(
    u: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,  # noqa: N803
    b_enc: Tensor,
    select: Select,
    dtype: torch.dtype = torch.float32,
    dead: Tensor | None = None,
) -> Encoded:
    """`topk_encode` with another selection rule (BatchTopK, per-token TopK, a threshold):
    z = ReLU(pre) at the entries `select` keeps, as (acts [N, w], idx [N, w]); with `dead`, the
    dead latents' pre-activations [N, n_dead] (dense AuxK). The same sparse backward."""
    dead = dead if dead is not None else torch.zeros(0, dtype=torch.int64, device=u.device)
    if not custom_path(W_enc):  # plain torch ops, autograd
        pre = torch.addmm(b_enc.to(dtype), (u - b_dec).to(dtype), W_enc.to(dtype))
        idx, keep = select(pre.detach())
        acts = (pre.gather(1, idx).float() * keep).relu()
        return Encoded(acts, idx, pre.index_select(1, dead).float(), idx.new_zeros(len(idx), 0))
    return Encoded(*_SelectEncode.apply(u, b_dec, W_enc, b_enc, select, dtype, dead))


def masked_code(pre: Tensor, mask: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """The entries `mask` [N, m] keeps of pre [N, m] as a code (idx i64[N, w], keep bool[N, w]):
    each row's kept latents, then other latents of the row with keep False (the indices of a row
    stay distinct, as TopK's). w: `width` (a row keeps its `width` largest kept entries), else the
    most entries of one row (at least 1)."""
    w = width or (max(1, int(mask.sum(1).max())) if mask.numel() else 1)
    _, idx = topk(pre.masked_fill(~mask, float("-inf")), w)
    return idx, mask.gather(1, idx)
