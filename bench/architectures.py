"""Time one full training step (forward, backward, Adam, decoder renorm) of every SAE architecture
(mlsae.sae.registry), side by side in one process, repeats interleaved, on the same vectors.

Contenders: each architecture's mlsae step, the same architecture as a plain dense fp32 torch
step with autograd (dense pre-activations, dense code, dense decoder: the same math), and
EleutherAI sparsify's SparseCoder for TopK (the one architecture it shares). Prints ms per step
and the ratios: each architecture vs its dense step, vs our TopK step, and TopK vs sparsify.
Batches hold whole tokens of --layers layers (N rounded down to a multiple of it), as the
per-token TopK over layers needs.

The crosscoder's batch is the same N vectors read as N / L token vectors of width L x d; its
code keeps k x L latents per token (matched active latents), so its FLOPs match the others'.

The sparse kernels or dense matmuls for the decoder and the encoder's backward
(`kernels.dense_pays` picks by the code's density): with the crosscoder, its step is also timed
with the sparse kernels forced ("crosscoder/sparse"; "vs sparse" > 1: the chosen path is faster), and
`--decode-sweep` times the decoder alone (forward and backward, sparse gather vs dense matmul)
over code densities at the MLSAE's shape (N vectors of d) and the crosscoder's (N / L tokens of
L x d), m = R x d latents.

Usage: .venv/bin/python bench/architectures.py [--n 4096 --d 576 --r 8 --k 32 --layers 30
       --repeats 5 --only topk crosscoder] [--decode-sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable

import torch

from mlsae.core.config import SaeConfig
from mlsae.sae import kernels
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.registry import ARCHITECTURES

PREFIXES = 4


def adam(params) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10)


def ours(
    arch: str, x: torch.Tensor, r: int, k: int, n_layers: int, dense_from: float | None = None
) -> Callable[[], None]:
    cfg = SaeConfig(
        d_in=x.shape[1],
        expansion_factor=r,
        k=k,
        layers=list(range(n_layers)),
        architecture=arch,
        matryoshka_prefixes=PREFIXES,
    )  # type: ignore[arg-type]
    sae = SparseAutoencoder(cfg, seed=0)
    sae.init_b_dec(x)
    opt = adam(sae.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with decode_density(dense_from):
            sae.train_step_forward(x).loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    return step


@contextlib.contextmanager
def decode_density(dense_from: float | None):
    """kernels.DENSE_DECODE_DENSITY set to `dense_from` inside, for rows of any width (None:
    both unchanged): 0 forces the dense matmuls, 2 the sparse kernels."""
    old = kernels.DENSE_DECODE_DENSITY, kernels.DENSE_DECODE_WIDTH
    if dense_from is not None:
        kernels.DENSE_DECODE_DENSITY, kernels.DENSE_DECODE_WIDTH = dense_from, 0
    try:
        yield
    finally:
        kernels.DENSE_DECODE_DENSITY, kernels.DENSE_DECODE_WIDTH = old


def decode_sweep(n: int, d: int, r: int, n_layers: int, repeats: int) -> None:
    """The decoder alone, forward + backward (grad acts, grad W_dec), sparse vs dense, over
    densities, at the MLSAE's and the crosscoder's shapes; prints ms and sparse / dense."""
    m = r * d
    print(f"decoder forward + backward, m={m}; best of {repeats} interleaved [median]")
    print(
        f"  {'shape':22s} {'density':>8s} {'sparse ms':>18s} {'dense ms':>18s} {'sparse/dense':>14s}"
    )
    for rows, width in ((n, d), (n // n_layers, d * n_layers)):
        g = torch.Generator().manual_seed(0)
        w_dec = torch.nn.Parameter(torch.randn(m, width, generator=g))
        for density in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3):
            w = max(1, round(density * m))
            idx = torch.rand(rows, m, generator=g).topk(w, dim=1).indices
            acts = torch.rand(rows, w, generator=g).requires_grad_(True)
            grad = torch.randn(rows, width, generator=g)
            times: dict[str, list[float]] = {"sparse": [], "dense": []}
            for rep in range(repeats + 1):
                for name, dense_from in (("sparse", 2.0), ("dense", 0.0)):
                    acts.grad = w_dec.grad = None
                    t0 = time.perf_counter()
                    with decode_density(dense_from):
                        kernels.sparse_decode(acts, idx, w_dec).backward(grad)
                    if rep:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            sp, de = times["sparse"], times["dense"]
            shape = f"{rows} x {width}"
            print(
                f"  {shape:22s} {w / m:8.3f} {min(sp):9.1f} [{statistics.median(sp):6.1f}] "
                f"{min(de):9.1f} [{statistics.median(de):6.1f}] {min(sp) / min(de):6.2f} "
                f"[{statistics.median(sp) / statistics.median(de):5.2f}]"
            )


def dense_code(arch: str, pre: torch.Tensor, k: int, n_layers: int) -> torch.Tensor:
    n, m = pre.shape
    if arch == "batchtopk":
        v, i = pre.reshape(-1).topk(k * n)
        return torch.zeros(n * m).scatter(0, i, v.relu()).view(n, m)
    if arch == "token_topk":
        g = pre.reshape(n // n_layers, n_layers * m)
        v, i = g.topk(k * n_layers, dim=1)
        return torch.zeros_like(g).scatter(1, i, v.relu()).view(n, m)
    v, i = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, i, v.relu())


def dense_crosscoder(x: torch.Tensor, r: int, k: int, n_layers: int) -> Callable[[], None]:
    """Plain dense fp32 autograd step of the crosscoder: encoder [L, d, F], decoder [F, L, d],
    TopK of k x L over each token's shared code (no AuxK, as ours)."""
    d = x.shape[1]
    m = d * r
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(n_layers, d, m, generator=g) * 2 - 1) / (n_layers * d) ** 0.5
    W_enc = torch.nn.Parameter(w)  # noqa: N806
    wd = w.permute(2, 0, 1).contiguous()
    W_dec = torch.nn.Parameter(wd / wd.flatten(1).norm(dim=1)[:, None, None])  # noqa: N806
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(m)), torch.nn.Parameter(torch.zeros(n_layers, d))
    opt = adam([W_enc, b_enc, W_dec, b_dec])
    u = ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)).view(-1, n_layers, d)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        pre = torch.einsum("tld,ldf->tf", u - b_dec, W_enc) + b_enc
        v, i = pre.topk(k * n_layers, dim=1)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        u_hat = torch.einsum("tf,fld->tld", z, W_dec) + b_dec
        ((u - u_hat).pow(2).sum() / (u - u.mean(0)).pow(2).sum()).backward()
        with torch.no_grad():
            gd, wf = W_dec.grad.flatten(1), W_dec.flatten(1)  # type: ignore[union-attr]
            gd -= (gd * wf).sum(1, keepdim=True) * wf
            opt.step()
            W_dec.div_(W_dec.flatten(1).norm(dim=1)[:, None, None])

    return step


def dense(arch: str, x: torch.Tensor, r: int, k: int, n_layers: int) -> Callable[[], None]:
    """Plain dense fp32 autograd step of `arch` (no AuxK, as ours above)."""
    if arch == "crosscoder":
        return dense_crosscoder(x, r, k, n_layers)
    d = x.shape[1]
    m = d * r
    g = torch.Generator().manual_seed(0)
    W_enc = torch.nn.Parameter((torch.rand(d, m, generator=g) * 2 - 1) / d**0.5)  # noqa: N806
    W_dec = torch.nn.Parameter(W_enc.detach().t() / W_enc.detach().t().norm(dim=1, keepdim=True))  # noqa: N806
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(m)), torch.nn.Parameter(torch.zeros(d))
    opt = adam([W_enc, b_enc, W_dec, b_dec])
    u = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)
    fvu = lambda uh: (u - uh).pow(2).sum() / (u - u.mean(0)).pow(2).sum()  # noqa: E731

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z = dense_code(arch, (u - b_dec) @ W_enc + b_enc, k, n_layers)
        loss = fvu(z @ W_dec + b_dec)
        if arch == "matryoshka":
            for p in range(PREFIXES - 1):
                size = m >> (PREFIXES - 1 - p)
                loss = loss + fvu(z[:, :size] @ W_dec[:size] + b_dec)
        loss.backward()
        with torch.no_grad():
            gd = W_dec.grad
            assert gd is not None
            gd -= (gd * W_dec).sum(1, keepdim=True) * W_dec
            opt.step()
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def sparsify_topk(x: torch.Tensor, r: int, k: int) -> Callable[[], None] | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from sparsify import SparseCoder, SparseCoderConfig
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None
    torch.manual_seed(0)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(expansion_factor=r, k=k))
    opt = adam(sae.parameters())
    u = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sae(u).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="vectors per step (whole tokens)")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layers", type=int, default=30, help="layers per token")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-dense", action="store_true", help="skip the dense references")
    p.add_argument(
        "--decode-sweep", action="store_true", help="time the decoder's two paths over densities"
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=list(ARCHITECTURES),
        choices=list(ARCHITECTURES),
        help="architectures to time (topk is always timed: the ratios' base)",
    )
    a = p.parse_args()
    if a.decode_sweep:
        decode_sweep(a.n // a.layers * a.layers, a.d, a.r, a.layers, a.repeats)
        return
    archs = [x for x in ARCHITECTURES if x == "topk" or x in a.only]
    n = a.n // a.layers * a.layers
    x = torch.randn(n, a.d, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    kernels.set_malloc_retain(True)
    fns: dict[str, Callable[[], None]] = {}
    for arch in archs:
        fns[arch] = ours(arch, x, a.r, a.k, a.layers)
        if arch == "crosscoder":
            fns["crosscoder/sparse"] = ours(arch, x, a.r, a.k, a.layers, dense_from=2.0)
        if not a.no_dense:
            fns[f"{arch}/dense"] = dense(arch, x, a.r, a.k, a.layers)
    sp = sparsify_topk(x, a.r, a.k)
    if sp is not None:
        fns["topk/sparsify"] = sp
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(a.repeats + 1):  # the first round is the warm-up
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
    print(
        f"N={n} ({n // a.layers} tokens x {a.layers} layers) d={a.d} R={a.r} k={a.k}; "
        f"kernels {kernels.kernel_backend()}; threads {torch.get_num_threads()}"
    )
    print("ms per step, best of", a.repeats, "interleaved repeats [median]")
    for name, t in times.items():
        print(f"  {name:20s} {min(t):9.1f} [{statistics.median(t):9.1f}]")
    best = {name: min(t) for name, t in times.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        "ratios, best [median]: vs dense / vs sparsify = their time / ours (> 1: ours faster); "
        "cost vs topk = this architecture's time / our TopK's"
    )
    for arch in archs:
        rows = [("vs dense", f"{arch}/dense", arch), ("cost vs topk", arch, "topk")]
        if arch == "crosscoder":  # > 1: the chosen (dense) decoder is faster
            rows.append(("vs sparse", "crosscoder/sparse", arch))
        if arch == "topk":
            rows.append(("vs sparsify", "topk/sparsify", "topk"))
        for label, num, den in rows:
            if num in best and den in best and num != den:
                print(
                    f"  {arch:11s} {label:13s} {best[num] / best[den]:6.2f} "
                    f"[{med[num] / med[den]:6.2f}]"
                )


if __name__ == "__main__":
    main()
