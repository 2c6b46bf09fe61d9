"""Fast CPU kernels of the TopK SAE: one implementation used by training, evaluation and analysis.

The dense pieces are the encoder matmul `pre = v @ W_enc + b_enc` (in the compute dtype) and
one top-k pass over `pre`; everything after the top-k is sparse:

- `topk`: exact row-wise top-k. `grouped` preselects candidates with a strided group max
  (the k largest group maxima hold every top-k element), then runs `torch.topk` on k*g
  candidates instead of d_sae columns.
- `LatentSegments` + `segment_sum`: the (sample, slot) entries sorted by latent, so a weight
  gradient is one `embedding_bag` segment sum per active latent (rows of inactive latents stay 0
  and are never touched): grad_W[j] = sum_{entries e of latent j} w_e * table[sample(e)].
- `sparse_decode`: x_hat[n] = sum_s acts[n, s] * W_dec[idx[n, s]] via `embedding_bag`, with a
  custom backward (grad acts = row dot products, grad W_dec = segment sums).
- `mlsae.sae.encoder.topk_encode` (its own module, built on these): encoder + top-k + ReLU
  with a sparse backward.

Two backends with the same math (`mlsae.sae.native`, chosen by MLSAE_KERNELS and logged once):
native C++ (compiled at first use: a group-max top-k that reads each pre-activation once,
a counting sort, column-blocked segment sums written straight into W_enc's [d, m] layout, and
row dots) and pure torch (the fallback, and the reference the tests compare the native kernels
with). Where torch's own kernel is faster (embedding_bag: the decoder and W_dec's gradient),
both backends use it.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mlsae.sae.native as native
from mlsae.core.errors import MlsaeError

TopkMethod = Literal["auto", "torch", "grouped", "native"]
TOPK_METHOD: TopkMethod = "auto"
"""Default top-k method: auto = native where the native backend is in use, else grouped where
the shape allows it (d_sae divisible by the group size, d_sae / g >= 2k, N >= 64), else
torch.topk. bench/train_step.py compares them."""
TOPK_GROUP = 16
"""Group size g of the grouped (torch) top-k."""


def kernel_backend() -> str:
    """'native' or 'torch': the backend the kernels use (resolved and logged once)."""
    return native.backend()


CPU_KERNELS = True
"""Use the custom kernels below for CPU tensors. Tensors on any other device (CUDA, MPS), or
every tensor when False (tests compare the two), take `encoder.plain_encode` / `plain_decode`: the
same math in plain differentiable torch ops."""


def custom_path(t: Tensor) -> bool:
    """Whether the custom CPU kernels handle tensors like t."""
    return CPU_KERNELS and t.device.type == "cpu"


# ----------------------------------------------------------------------------- memory


def set_malloc_retain(on: bool = True) -> bool:
    """on: make glibc malloc serve big tensors from its heap and keep freed memory (mallopt
    M_MMAP_THRESHOLD / M_TRIM_THRESHOLD 1 GiB / 2 GiB) instead of mmap/munmap per allocation, so
    a training step's large temporaries (the [N, d_sae] pre-activations, [d_sae, d] gradients)
    are not page-faulted in again every step; the process keeps its peak memory. off: glibc's
    steady state (blocks over 32 MiB mmapped, heap trimmed above 64 MiB). Process-wide;
    Linux/glibc only; returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    mmap_at, trim_at = (1 << 30, (1 << 31) - 1) if on else (32 << 20, 64 << 20)
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(
            libc.mallopt(m_mmap_threshold, mmap_at) and libc.mallopt(m_trim_threshold, trim_at)
        )
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- top-k


def _grouped_ok(m: int, k: int, g: int) -> bool:
    return g > 1 and m % g == 0 and m // g >= 2 * k


def topk(pre: Tensor, k: int, method: TopkMethod | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise k largest values of pre [N, m] and their column indices (both [N, k], in no
    particular order). Exact: the values equal `torch.topk`'s (indices differ only at ties)."""
    method = method or TOPK_METHOD
    if method in ("auto", "native"):
        so = native.active()
        if so is not None:
            vals, idx = native.topk(pre, k, so)
            return vals.to(pre.dtype), idx
        if method == "native":
            raise MlsaeError("top-k method 'native' needs the native kernels (MLSAE_KERNELS)")
    n, m = pre.shape
    g = TOPK_GROUP
    if method == "torch" or not _grouped_ok(m, k, g) or (method == "auto" and n < 64):
        return pre.topk(k, dim=1, sorted=False)
    s = m // g
    gmax = pre.reshape(n, g, s).amax(
        1
    )  # [N, s]: max over the strided group {c, c+s, ..., c+(g-1)s}
    gi = gmax.topk(k, dim=1, sorted=False).indices  # [N, k] groups holding all top-k elements
    cols = (gi.unsqueeze(1) + torch.arange(0, m, s).view(1, g, 1)).view(n, k * g)  # [N, k*g]
    vals, j = pre.gather(1, cols).topk(k, dim=1, sorted=False)  # [N, k]
    return vals, cols.gather(1, j)


# ----------------------------------------------------------------------------- segments


class LatentSegments(NamedTuple):
    """Entries of an index matrix [N, k] grouped by latent (CSR by latent). Entry e = n*k + s
    is slot s of sample n."""

    order: Tensor  # [N*k] entry ids, latent by latent (ascending within a latent)
    offsets: Tensor  # [m + 1] segment bounds: latent j owns order[offsets[j]:offsets[j+1]]
    flat: Tensor  # [N*k] latent of each entry (original order)
    k: int


_SEG_MEMO: list = [None, None]  # [(idx, version, m), segments]: encoder and decoder share it


def latent_segments(idx: Tensor, m: int) -> LatentSegments:
    """Sort the entries of idx [N, k] (values in [0, m)) by latent (memoised for the last idx:
    the encoder and decoder backward of one step sort the same indices)."""
    key = _SEG_MEMO[0]  # the memo holds idx, so its storage cannot be reused by another tensor
    if (
        key is not None
        and key[0].data_ptr() == idx.data_ptr()
        and key[0].shape == idx.shape
        and key[0].stride() == idx.stride()
        and key[0]._version == key[1] == idx._version
        and key[2] == m
    ):
        return _SEG_MEMO[1]
    k = idx.shape[1]
    flat = idx.reshape(-1)
    so = native.active()
    if so is not None:
        offsets, order = native.segments(idx, m, so)
    else:
        order = torch.sort(flat, stable=True).indices  # [N*k]
        offsets = torch.zeros(m + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(flat, minlength=m), 0, out=offsets[1:])
    seg = LatentSegments(order, offsets, flat, k)
    _SEG_MEMO[:] = [(idx, idx._version, m), seg]
    return seg


def segment_sum(
    seg: LatentSegments, table: Tensor, weights: Tensor, transposed: bool = False
) -> tuple[Tensor, Tensor]:
    """out[j] = sum over entries e of latent j of weights[e] * table[sample(e)]: [m, d], or
    its transpose [d, m] (contiguous) if `transposed`; and the per-latent sums of the weights
    [m]. table [N, d]; weights [N, k] (same layout as the index matrix). This is the transpose
    product sparse(weights)^T @ table over the active entries only.

    [m, d] is torch's embedding_bag over the latents' entries on every backend; [d, m] is the
    native kernel's where it is built (it writes that layout directly, where embedding_bag would
    need a transposing copy). Measured in the training step on a 2-core AVX2 EPYC (N 4,096,
    d 576, m 4,608, k 32): native [m, d] and gather-sum decoder 27.6 ms vs embedding_bag 15 ms."""
    so = native.active()
    if so is not None and transposed:
        return native.segment_sum(seg.offsets, seg.order, seg.k, weights, table, so, transposed)
    w = weights.reshape(-1).index_select(0, seg.order).to(table.dtype)
    rows = torch.div(seg.order, seg.k, rounding_mode="floor")
    out = F.embedding_bag(
        rows, table.contiguous(), seg.offsets[:-1], mode="sum", per_sample_weights=w
    )
    m = seg.offsets.numel() - 1
    cols = torch.zeros(m, dtype=w.dtype).index_add_(0, seg.flat, weights.reshape(-1).to(w.dtype))
    return (out.t().contiguous() if transposed else out), cols


def _row_dots(grad: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """out[n, s] = grad[n] . weight[idx[n, s]]: [N, k], without materialising weight[idx]."""
    so = native.active()
    if so is not None:
        return native.row_dots(grad, idx, weight, so)
    n, k = idx.shape
    flat = idx.reshape(-1)
    try:
        offsets = torch.arange(0, n * k, k)
        bag = torch.arange(n).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad.contiguous(), weight, flat, offsets, bag, 0, -1
        )
        return out.view(n, k)
    except (AttributeError, RuntimeError):  # pragma: no cover - private op missing
        out = torch.empty(n, k, dtype=grad.dtype)
        for s in range(0, n, 256):
            w = weight.index_select(0, flat[s * k : (s + 256) * k]).view(-1, k, weight.shape[1])
            out[s : s + 256] = torch.bmm(w, grad[s : s + 256].unsqueeze(2)).squeeze(2)
        return out


# ----------------------------------------------------------------------------- decoder

DENSE_DECODE_DENSITY, DENSE_DECODE_WIDTH = 0.15, 4096
"""`sparse_decode_aux` decodes a code as a dense matmul (`dense_decode`) when its rows keep at
least DENSE_DECODE_DENSITY of the m latents (code width / m) and the decoder's rows are at least
DENSE_DECODE_WIDTH wide; otherwise the embedding-bag gather (`_SparseDecode`). Measured
(`python bench/architectures.py --n 4080 --r 4 --decode-sweep`, m 2,304, forward + backward,
sparse / dense time): rows of 17,280 (the crosscoder's 136 tokens x 30 layers x 576) 0.53 at
density 0.05, 0.95 at 0.10, 1.52 at 0.20, 1.82 at 0.30; rows of 576 (4,080 vectors) 0.42 at
0.10, 0.75 at 0.20, 1.14 at 0.30. The crosscoder's code is 21% dense at R 4 (k x L = 480 of
2,304 latents per token); TopK codes are ~0.7% (k 16 of 2,304)."""


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, idx, W_dec, aux_acts, aux_ids):  # noqa: N803
        ctx.save_for_backward(acts, idx, W_dec, aux_acts, aux_ids)
        # torch's embedding_bag on every backend: faster than a native gather-sum (see segment_sum)
        out = F.embedding_bag(idx, W_dec, mode="sum", per_sample_weights=acts.to(W_dec.dtype))
        return out, _aux_decode(aux_acts, aux_ids, W_dec)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        grad, g_aux = grads  # [N, d] each (None where an output is unused)
        acts, idx, W_dec, aux_acts, aux_ids = ctx.saved_tensors
        grad = grad if grad is not None else acts.new_zeros(acts.shape[0], W_dec.shape[1])
        g_acts = g_w = g_aux_acts = None
        if ctx.needs_input_grad[0]:
            g_acts = _row_dots(grad, W_dec, idx).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            g_w = segment_sum(latent_segments(idx, W_dec.shape[0]), grad, acts)[0]
            if g_aux is not None and aux_ids.numel():  # into the same tensor: no second [m, d]
                g_w.index_add_(0, aux_ids, aux_acts.t() @ g_aux)
        if ctx.needs_input_grad[3] and g_aux is not None:
            g_aux_acts = g_aux @ W_dec.index_select(0, aux_ids).t()
        return g_acts, None, g_w, g_aux_acts, None


def sparse_decode(acts: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:  # noqa: N803
    """sum_s acts[n, s] * W_dec[idx[n, s]]: acts f32[N, k], idx i64[N, k], W_dec [m, d] ->
    [N, d] (no bias). Backward: grad acts = row dots, grad W_dec touches active rows only."""
    return sparse_decode_aux(acts, idx, W_dec)[0]


def sparse_decode_aux(
    acts: Tensor,
    idx: Tensor,
    W_dec: Tensor,  # noqa: N803
    aux_acts: Tensor | None = None,
    aux_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(`sparse_decode(acts, idx, W_dec)`, aux_acts @ W_dec[aux_ids]): AuxK's dense decode of
    the dead latents' activations aux_acts f32[N, n_dead] (aux_ids i64[n_dead], distinct) in
    the same autograd node, so both add into one W_dec gradient tensor. Without aux: [N, 0]."""
    if aux_acts is None or aux_ids is None:
        aux_ids = idx.new_zeros(0)
        aux_acts = acts.new_zeros(acts.shape[0], 0)
    if dense_pays(idx.shape[1], W_dec.shape[0], W_dec.shape[1]):
        return dense_decode(acts, idx, W_dec), _aux_decode(aux_acts, aux_ids, W_dec)
    if idx.shape[1] == 0 or not custom_path(W_dec):
        main = (
            plain_decode(acts, idx, W_dec)
            if idx.shape[1]
            else acts.new_zeros(acts.shape[0], W_dec.shape[1])
        )
        return main, _aux_decode(aux_acts, aux_ids, W_dec)
    return _SparseDecode.apply(acts, idx, W_dec, aux_acts, aux_ids)


def dense_pays(width: int, m: int, d: int) -> bool:
    """Whether a code keeping `width` of m latents per row, over weight rows of d, goes through
    dense matmuls (the decoder, the encoder's backward) rather than the sparse kernels."""
    return width >= DENSE_DECODE_DENSITY * m and d >= DENSE_DECODE_WIDTH


def dense_decode(acts: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:  # noqa: N803
    """`sparse_decode` as a dense matmul: the code scattered to z [N, m], then z @ W_dec (autograd:
    grad W_dec = z^T @ grad, grad acts = (grad @ W_dec^T) at the code's entries). The indices of a
    row must be distinct (the code contract)."""
    z = acts.new_zeros(acts.shape[0], W_dec.shape[0]).scatter(1, idx, acts)  # [N, m]
    return z.to(W_dec.dtype) @ W_dec


def _aux_decode(aux_acts: Tensor, aux_ids: Tensor, W_dec: Tensor) -> Tensor:  # noqa: N803
    """aux_acts @ W_dec[aux_ids]: [N, d], or [N, 0] without aux ids (nothing computed)."""
    if aux_ids.numel() == 0:
        return aux_acts.new_zeros(aux_acts.shape[0], 0)
    return aux_acts @ W_dec.index_select(0, aux_ids)


def plain_decode(acts: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:  # noqa: N803
    """`sparse_decode` in plain differentiable torch ops: embedding_bag (its own backward) on
    CUDA and the CPU, a dense scatter-matmul elsewhere (MPS)."""
    if W_dec.device.type in ("cuda", "cpu"):
        return F.embedding_bag(idx, W_dec, mode="sum", per_sample_weights=acts.to(W_dec.dtype))
    z = acts.new_zeros(acts.shape[0], W_dec.shape[0]).scatter(1, idx, acts)  # [N, m]
    return z.to(W_dec.dtype) @ W_dec
