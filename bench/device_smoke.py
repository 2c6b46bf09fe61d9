"""The first thing to run on a GPU machine: is training on the device the same as on the CPU,
and how fast is it?

1. What torch sees: the device `--device` resolves to and the compute dtype `auto` picks there.
2. Equality: one SAE trained for --steps steps on the same batches on the device and on the CPU
   (both float32 compute, TF32 off): per-step losses and final weights must agree within
   tolerance (summation order differs between devices, so not bit for bit). The device run
   takes the plain-torch path (`mlsae.sae.encoder.plain_encode`, `mlsae.sae.kernels.plain_decode`), the CPU run the
   custom CPU kernels: this also checks the two paths against each other.
3. The model on the device: block outputs of a few contexts of --model on the device vs the CPU.
4. Throughput: training steps on the device (compute dtype auto: bf16 + TF32 on Ampere and
   later) vs the CPU, interleaved repeats (best and median vectors/s).
5. End to end: `mlsae train --device DEV` streaming from --model for a few steps (exit 0).
Without a GPU (here), --device resolves to the CPU and the "device" run is the CPU with the
custom kernels switched off, so the script itself is exercised.

Usage: python bench/device_smoke.py [--device auto] [--model default] [--steps 30]
       [--d 576 --r 8 --k 32 --batch 4096] [--skip-model]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlsae.core.compute import describe_device, resolve_compute_dtype, resolve_device
from mlsae.core.config import SaeConfig, TrainConfig
from mlsae.sae import kernels
from mlsae.sae.autoencoder import SparseAutoencoder
from mlsae.train.member import Member, make_adam


def batches(n: int, batch: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    """Sparse combinations of a random dictionary plus noise: [batch, d] float32 each."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(4 * d, d, generator=g)
    out = []
    for _ in range(n):
        z = torch.zeros(batch, 4 * d).scatter_(
            1, torch.randint(0, 4 * d, (batch, 8), generator=g), torch.rand(batch, 8, generator=g)
        )
        out.append(z @ dic + 0.05 * torch.randn(batch, d, generator=g))
    return out


def train(
    device: torch.device, xs: list[torch.Tensor], a: argparse.Namespace, dtype: torch.dtype
) -> tuple[SparseAutoencoder, list[float], float]:
    """(SAE, per-step losses, vectors/s after the first step) of a run on `device`."""
    cfg = TrainConfig(lr=1e-3, dead_tokens=2 * a.batch)
    sae = SparseAutoencoder(
        SaeConfig(d_in=a.d, expansion_factor=a.r, k=a.k, layers=[0]),
        seed=0,
        compute_dtype=dtype,
        device=device,
    )
    m = Member(
        "s",
        sae,
        make_adam(sae.parameters(), cfg),
        None,
        torch.zeros(sae.cfg.d_sae, dtype=torch.float64),
    )
    losses, t0 = [], 0.0
    for i, x in enumerate(xs):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        losses.append(m.step(x.to(device), cfg, cfg.resolved_k_aux(a.d))["loss"])
    sync(device)
    vps = (len(xs) - 1) * a.batch / max(time.perf_counter() - t0, 1e-9)
    return sae, losses, vps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true", help="skip sections 3 and 5")
    a = ap.parse_args()
    dev, cpu = resolve_device(a.device), torch.device("cpu")
    plain_cpu = dev.type == "cpu"
    auto = resolve_compute_dtype("auto", verbose=False, device=dev)
    print(
        f"1. torch {torch.__version__}; cuda available {torch.cuda.is_available()}; "
        f"device {describe_device(dev)}; compute dtype auto = {auto}"
    )
    if plain_cpu:
        print("   no GPU: the 'device' runs are the CPU with the custom kernels off")

    xs = batches(a.steps, a.batch, a.d)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, ref_loss, _ = train(cpu, xs, a, torch.float32)
    kernels.CPU_KERNELS = not plain_cpu
    got, got_loss, _ = train(dev, xs, a, torch.float32)
    kernels.CPU_KERNELS = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = max(abs(x - y) / abs(y) for x, y in zip(got_loss, ref_loss, strict=True))
    wdiff = max(
        float((p.detach().cpu() - q.detach()).abs().max())
        for p, q in zip(got.parameters(), ref.parameters(), strict=True)
    )
    ok = rel < 1e-3 and wdiff < 1e-3
    print(
        f"2. {a.steps} float32 steps, device vs CPU: max relative loss difference {rel:.2e}, "
        f"max weight difference {wdiff:.2e} -> {'OK' if ok else 'MISMATCH'}"
    )

    if not a.skip_model:
        from mlsae.core.config import ModelConfig
        from mlsae.data.capture import capture
        from mlsae.data.model import load_model

        lm_cpu = load_model(ModelConfig(model=a.model, device="cpu"))
        lm_dev = load_model(ModelConfig(model=a.model, device=str(dev)))
        ids = torch.randint(
            0, len(lm_cpu.tokenizer), (2, 64), generator=torch.Generator().manual_seed(0)
        )
        layers = list(range(lm_cpu.n_layers))
        x_cpu, x_dev = capture(lm_cpu.model, ids, layers), capture(lm_dev.model, ids, layers)
        err = float(((x_dev - x_cpu).norm(dim=-1) / x_cpu.norm(dim=-1).clamp_min(1e-6)).max())
        print(f"3. {a.model} block outputs on {dev} vs CPU: max relative difference {err:.2e}")

    rows: dict[str, list[float]] = {"device": [], "cpu": []}
    for _ in range(a.repeats):
        kernels.CPU_KERNELS = not plain_cpu
        rows["device"].append(train(dev, xs[:8], a, auto)[2])
        kernels.CPU_KERNELS = True
        rows["cpu"].append(train(cpu, xs[:8], a, resolve_compute_dtype("auto", False, cpu))[2])
    print(f"4. training throughput (d {a.d}, R {a.r}, k {a.k}, batch {a.batch}):")
    for k, v in rows.items():
        print(f"   {k:<7} best {max(v):>10.0f} vectors/s   median {statistics.median(v):>10.0f}")
    ratio = [x / y for x, y in zip(rows["device"], rows["cpu"], strict=True)]
    print(f"   device / CPU: best {max(ratio):.1f}x, median {statistics.median(ratio):.1f}x")

    if not a.skip_model:
        with tempfile.TemporaryDirectory() as t:
            cmd = [
                sys.executable,
                "-m",
                "mlsae",
                "train",
                "--device",
                a.device,
                "--model",
                a.model,
                "--tokens",
                "4096",
                "--max-steps",
                "10",
                "--batch-tokens",
                "4096",
                "--out",
                str(Path(t) / "run"),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            print(f"5. {' '.join(cmd[2:])}: exit {r.returncode}; {tail}")
            if r.returncode:
                print(r.stderr[-3000:])


if __name__ == "__main__":
    main()
