"""Time one full SAE training step (forward, backward, Adam, decoder renorm) on this CPU.

Contenders, on the same inputs, repeats interleaved in one run:
  mlsae      this project (sparse decoder/encoder gradients, fast top-k), in the compute dtype
             `--compute-dtype auto` chose on this CPU (its calibration is printed), with the
             kernel backend in use (native C++ where it builds)
  mlsae/bf16 or mlsae/fp32: the same step in the other dtype (where the calibration did not
             find bf16 more than 2x slower, or with --both-dtypes)
  mlsae+aux  the same with AuxK on 5% dead latents
  mlsae/torch  the same step with the pure-torch fallback kernels
  dense      a plain dense fp32 TopK SAE with autograd (same math)
  sparsify   EleutherAI sparsify's SparseCoder (pip eai-sparsify, CPU fallback path)
  roofline   the encoder forward matmul alone in the chosen dtype (roofline/bf16 or /fp32: in
             the other, where that runs); "of roofline" is against the fastest one measured
Also compares the top-k methods on the same pre-activations and breaks our step into phases;
--aux-sweep F,F,... times AuxK's dense and sparse paths at those dead fractions.

Usage: .venv/bin/python bench/train_step.py [--n 4096 --d 576 --r 8 --k 32 --repeats 5]
       [--aux-sweep 0.05,0.2,0.4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mlsae.core.calibrate import cpu_calibration
from mlsae.core.compute import cpu_capability, resolve_compute_dtype
from mlsae.core.config import SaeConfig
from mlsae.sae import kernels, native, topk
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.sae.encoder import AUX_SPARSE_RATIO
from mlsae.train.member import step_probe

CLOCK = time.perf_counter
"""Wall clock; --cpu-time switches to this thread's CPU time (with --threads 1: the compute
alone, unaffected by other processes competing for the cores)."""


def adam(params) -> torch.optim.Optimizer:
    """Adam as in SPEC 2 (fused kernel where torch has one for CPU)."""
    try:
        return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10)


def ours(
    x: torch.Tensor,
    d: int,
    r: int,
    k: int,
    dead_frac: float = 0.0,
    torch_kernels: bool = False,
    aux_sparse: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[[], None]:
    """Our step (in `dtype`, default auto's); aux_sparse forces AuxK's sparse (True) or dense
    (False) path."""
    sae = SparseAutoencoder(SaeConfig(d_in=d, expansion_factor=r, k=k), seed=0, compute_dtype=dtype)
    sae.init_b_dec(x)
    opt = adam(sae.parameters())
    m = d * r
    dead = torch.randperm(m, generator=torch.Generator().manual_seed(1))[: int(dead_frac * m)]
    k_aux = 256 if dead_frac else 0

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if aux_sparse is not None:
            topk.AUX_SPARSE_RATIO = 0 if aux_sparse else 1 << 62
        out = sae.train_step_forward(x, dead if dead_frac else None, k_aux, 1 / 32)
        topk.AUX_SPARSE_RATIO = AUX_SPARSE_RATIO
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    def step_torch() -> None:
        with native.forced_torch():
            step()

    return step_torch if torch_kernels else step


def dense(x: torch.Tensor, d: int, r: int, k: int) -> Callable[[], None]:
    """Plain dense fp32 reference: dense pre, dense scatter of the top-k, dense decoder."""
    m = d * r
    g = torch.Generator().manual_seed(0)
    W_enc = torch.nn.Parameter((torch.rand(d, m, generator=g) * 2 - 1) / d**0.5)  # noqa: N806
    W_dec = torch.nn.Parameter(W_enc.detach().t() / W_enc.detach().t().norm(dim=1, keepdim=True))  # noqa: N806
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(m)), torch.nn.Parameter(torch.zeros(d))
    opt = adam([W_enc, b_enc, W_dec, b_dec])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True) + 1e-5
        u = (x - mean) / std
        pre = (u - b_dec) @ W_enc + b_enc
        v, i = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        u_hat = z @ W_dec + b_dec
        loss = (u - u_hat).pow(2).sum() / (u - u.mean(0)).pow(2).sum()
        loss.backward()
        with torch.no_grad():
            gd = W_dec.grad
            gd -= (gd * W_dec).sum(1, keepdim=True) * W_dec
            opt.step()
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def sparsify_step(x: torch.Tensor, d: int, r: int, k: int) -> Callable[[], None] | str:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from sparsify import SparseCoder, SparseCoderConfig
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        return f"sparsify unavailable ({type(e).__name__}: {e}); pip install eai-sparsify"
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(expansion_factor=r, k=k))
    opt = adam(sae.parameters())
    u = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)  # same space as ours

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = sae(u)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def roofline(x: torch.Tensor, d: int, r: int, dt: torch.dtype) -> Callable[[], None]:
    """The encoder's forward matmul alone in dtype dt."""
    W = torch.randn(d, d * r).to(dt)  # noqa: N806
    b = torch.zeros(d * r, dtype=dt)
    xb = x.to(dt)
    return lambda: torch.addmm(b, xb, W)


def short(dt: torch.dtype) -> str:
    return "bf16" if dt == torch.bfloat16 else "fp32"


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, retain: dict[str, bool] | None = None
) -> dict[str, list[float]]:
    """ms per call of each function, calls interleaved (one warm-up each). retain[name]: the
    malloc mode (kernels.set_malloc_retain) set before that function runs, outside the timing."""
    retain = retain or {}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(repeats + 1):
        for n, f in fns.items():
            if n in retain:
                kernels.set_malloc_retain(retain[n])
            t0 = CLOCK()
            f()
            if rep:  # the first round is the warm-up
                times[n].append((CLOCK() - t0) * 1e3)
    return times


def phases(x: torch.Tensor, d: int, r: int, k: int, repeats: int) -> dict[str, float]:
    """Median ms of each phase of our step."""
    sae = SparseAutoencoder(SaeConfig(d_in=d, expansion_factor=r, k=k), seed=0)
    opt = adam(sae.parameters())
    u = sae.normalize(x)[0]
    dt = sae.compute_dtype
    acc: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t1 = CLOCK()
        acc.setdefault(name, []).append((t1 - t0) * 1e3)
        return t1

    for _ in range(repeats + 1):
        t = CLOCK()
        pre = torch.addmm(sae.b_enc.to(dt), (u - sae.b_dec).to(dt), sae.W_enc.to(dt))
        t = tick("encoder matmul", t)
        kernels.topk(pre, k)
        t = tick("top-k", t)
        del pre
        opt.zero_grad(set_to_none=True)
        t = CLOCK()
        out = sae.train_step_forward(x)
        t = tick("forward (all)", t)
        out.loss.backward()
        t = tick("backward", t)
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        tick("adam + decoder projection/renorm", t)
    return {n: min(v[1:]) for n, v in acc.items()}


def cpu_model() -> str:
    """CPU model name and its SIMD flags that matter here."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
        "unknown CPU",
    )
    flags = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({' '.join(simd) or 'no AVX2'})"


def ratio_line(name: str, times: dict[str, list[float]], num: str, den: str, goal: str) -> str:
    """num/den time ratio from the best and from the median times."""
    b = min(times[num]) / min(times[den])
    m = statistics.median(times[num]) / statistics.median(times[den])
    return f"  {name:28s} best {b:6.2f}   median {m:6.2f}   ({goal})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="vectors per step")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-sparsify", action="store_true")
    p.add_argument(
        "--no-retain", action="store_true", help="run mlsae with glibc's default malloc too"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--aux-sweep", default="", help="dead fractions, e.g. 0.05,0.2,0.4")
    p.add_argument(
        "--cpu-time", action="store_true", help="time with thread CPU time (use with --threads 1)"
    )
    p.add_argument(
        "--both-dtypes", action="store_true", help="time the other dtype's rows even where slow"
    )
    a = p.parse_args()
    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        CLOCK = time.thread_time
    ours_retain = not a.no_retain and kernels.set_malloc_retain(True)
    torch.manual_seed(0)
    x = torch.randn(a.n, a.d) * (1 + torch.rand(a.d)) + torch.randn(a.d)  # [N, d]
    shape, probe = (a.d, a.d * a.r), step_probe(a.d, a.r, a.k)
    dt = resolve_compute_dtype("auto", verbose=False, shape=shape, probe=probe)
    cal = cpu_calibration(*shape, probe=probe)
    other = torch.float32 if dt == torch.bfloat16 else torch.bfloat16
    both = a.both_dtypes or cal.stage != "probe"
    print(
        f"CPU {cpu_model()}; torch capability {cpu_capability()}; threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}"
    )
    print(f"compute dtype (auto): {cal.summary()}")
    if not both:
        print(
            f"  {short(other)} rows skipped: the calibration found {short(other)} more than "
            "2x slower here (--both-dtypes times them anyway)"
        )
    print(f"SAE kernel backend: {native.backend()} (MLSAE_KERNELS=auto|native|torch)")
    print(f"shape: N={a.n} d={a.d} R={a.r} (d_sae={a.d * a.r}) k={a.k}; compute dtype {dt}")
    print(
        f"malloc: mlsae {'keeps freed memory (as `mlsae train` sets it)' if ours_retain else 'default'}"
        "; roofline without page faults; dense and sparsify with glibc's default"
    )

    # top-k methods on the same pre-activations
    pre = (x @ torch.randn(a.d, a.d * a.r) / a.d**0.5).to(dt)
    ref = pre.topk(a.k, dim=1).values
    methods = ("torch", "grouped") + (("native",) if native.backend() == "native" else ())
    tk = {m: (lambda m=m: kernels.topk(pre, a.k, m)) for m in methods}
    for m, f in tk.items():
        v, i = f()
        ok = torch.equal(v.sort(1, descending=True).values, ref) and torch.equal(
            pre.gather(1, i), v
        )
        assert ok, f"top-k method {m} is not exact"
    tt = interleaved(tk, a.repeats)
    print(
        "top-k on [N, d_sae] (ms, min/median): "
        + ", ".join(f"{m} {min(v):.1f}/{statistics.median(v):.1f}" for m, v in tt.items())
        + f"  (default: {kernels.TOPK_METHOD}, group {kernels.TOPK_GROUP})"
    )

    fns: dict[str, Callable[[], None]] = {
        "mlsae": ours(x, a.d, a.r, a.k, dtype=dt),
        "mlsae+aux": ours(x, a.d, a.r, a.k, dead_frac=0.05, dtype=dt),
        "dense": dense(x, a.d, a.r, a.k),
    }
    if both:
        fns[f"mlsae/{short(other)}"] = ours(x, a.d, a.r, a.k, dtype=other)
        fns[f"mlsae+aux/{short(other)}"] = ours(x, a.d, a.r, a.k, dead_frac=0.05, dtype=other)
    if native.backend() == "native":
        fns["mlsae/torch"] = ours(x, a.d, a.r, a.k, torch_kernels=True)
    sp = "skipped (--no-sparsify)" if a.no_sparsify else sparsify_step(x, a.d, a.r, a.k)
    if callable(sp):
        fns["sparsify"] = sp
    else:
        print(sp)
    fns["roofline"] = roofline(x, a.d, a.r, dt)
    if both:
        fns[f"roofline/{short(other)}"] = roofline(x, a.d, a.r, other)
    modes = {n: ours_retain for n in fns if n.startswith("mlsae")}
    modes |= {"dense": False, "sparsify": False, "roofline": True, f"roofline/{short(other)}": True}
    times = interleaved(fns, a.repeats, modes)
    roof = min((n for n in times if n.startswith("roofline")), key=lambda n: min(times[n]))
    best = {n: min(v) for n, v in times.items()}  # least disturbed by other processes
    clock = "thread CPU time" if a.cpu_time else "wall clock"
    print(
        f"\nms per step ({clock}), best of {a.repeats} interleaved repeats (median in "
        f"brackets); mlsae and roofline in {dt} (auto's choice)"
        + (f", /{short(other)}: in {other}" if both else "")
    )
    for n, v in times.items():
        med = statistics.median(v)
        print(f"  {n:14s} {best[n]:8.1f}  [{med:.1f}]  {a.n / best[n] * 1e3:10.0f} vectors/s")
    print(
        "\nratios (throughput of mlsae vs ..., i.e. their time / ours; of roofline = roofline "
        "time / ours), from the best and from the median times:"
    )
    if "sparsify" in times:
        print(ratio_line("vs sparsify", times, "sparsify", "mlsae", "goal >= 3x"))
    print(ratio_line("vs dense", times, "dense", "mlsae", "plain dense autograd"))
    if "mlsae/torch" in times:
        print(ratio_line("vs torch kernels", times, "mlsae/torch", "mlsae", "native vs fallback"))
    print(f"  (roofline: {roof}, the fastest dtype's encoder matmul)")
    print(ratio_line("of roofline", times, roof, "mlsae", "goal >= 0.70"))
    print(ratio_line("of roofline with AuxK", times, roof, "mlsae+aux", "goal >= 0.60"))
    if both:
        o = short(other)
        print(ratio_line(f"mlsae/{o} vs mlsae", times, f"mlsae/{o}", "mlsae", f"{o} time / auto's"))
        print(ratio_line(f"mlsae/{o} of roofline", times, roof, f"mlsae/{o}", "the other dtype"))

    kernels.set_malloc_retain(ours_retain)
    ph = phases(x, a.d, a.r, a.k, a.repeats)
    print("\nour step by phase (best ms): " + ", ".join(f"{n} {v:.1f}" for n, v in ph.items()))
    if a.aux_sweep:
        aux_sweep(x, a, [float(f) for f in a.aux_sweep.split(",")])


def aux_sweep(x: torch.Tensor, a: argparse.Namespace, fracs: list[float]) -> None:
    """Our step with AuxK's dense and sparse paths forced, at several dead fractions."""
    m = a.d * a.r
    fns = {
        (f, sp): ours(x, a.d, a.r, a.k, dead_frac=f, aux_sparse=sp)
        for f in fracs
        for sp in (False, True)
    }
    times = interleaved({f"{f}/{sp}": fn for (f, sp), fn in fns.items()}, a.repeats)
    print(
        f"\nAuxK by dead fraction (k_aux 256; sparse beyond {AUX_SPARSE_RATIO} x k_aux dead), "
        "ms best [median]:"
    )
    for f in fracs:
        dn, sp = times[f"{f}/False"], times[f"{f}/True"]
        print(
            f"  {f:5.2f} ({int(f * m):5d} dead): dense {min(dn):7.1f} [{statistics.median(dn):.1f}]"
            f"  sparse {min(sp):7.1f} [{statistics.median(sp):.1f}]"
        )


if __name__ == "__main__":
    main()
