"""Devices: --device resolution and the compute dtype per device (GPU availability mocked: this
machine has none), and the plain-torch path that every non-CPU tensor takes, against the custom
CPU kernels."""

from __future__ import annotations

import pytest
import torch

from mlsae.core import compute
from mlsae.core.calibrate import Calibration
from mlsae.core.compute import resolve_compute_dtype, resolve_device
from mlsae.core.config import ModelConfig, SaeConfig
from mlsae.core.errors import MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.sae import kernels
from mlsae.sae.autoencoder import SparseAutoencoder, geometric_median


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this torch sees two CUDA GPUs of compute capability `cap` (set cap[0])."""
    cap = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield cap
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_device_resolution_without_gpu(monkeypatch):
    monkeypatch.setattr(compute, "_mps_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(MlsaeError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(MlsaeError, match="--device cuda:1: no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(MlsaeError, match="--device mps: .* not available"):
        resolve_device("mps")
    monkeypatch.setattr(compute, "_mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    with pytest.raises(MlsaeError, match="must be auto, cpu"):
        resolve_device("gpu")


def test_device_resolution_with_gpus(gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MlsaeError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each process its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def _verdict(bf16: bool) -> Calibration:
    return Calibration(
        "cpu", torch.__version__, 1, [8, 16], "bfloat16" if bf16 else "float32", "steps", [1.0, 1.0]
    )


def test_compute_dtype_is_decided_per_device(gpus, monkeypatch):
    fast = [False]  # the CPU calibration's verdict (tests/test_compute.py tests the measurement)
    monkeypatch.setattr(compute, "cpu_calibration", lambda *a, **k: _verdict(fast[0]))
    # a GPU merely present does not make the CPU's matmuls bf16 (the old rule did)
    assert resolve_compute_dtype("auto", verbose=False, device="cpu") == torch.float32
    assert resolve_compute_dtype("auto", verbose=False) == torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    assert resolve_compute_dtype("auto", verbose=False, device="cuda:0") == torch.bfloat16
    assert torch.backends.cuda.matmul.allow_tf32  # Ampere+: float32 matmuls as TF32
    assert resolve_compute_dtype("float32", verbose=False, device="cuda:0") == torch.float32
    gpus[0] = (7, 5)  # Turing: no native bf16, no TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    assert resolve_compute_dtype("auto", verbose=False, device="cuda:0") == torch.float32
    assert not torch.backends.cuda.matmul.allow_tf32
    assert resolve_compute_dtype("auto", verbose=False, device="mps") == torch.float32
    fast[0] = True
    assert resolve_compute_dtype("auto", verbose=False, device="cpu") == torch.bfloat16
    assert resolve_compute_dtype("bfloat16", verbose=False, device="mps") == torch.bfloat16
    with pytest.raises(MlsaeError, match="unknown compute dtype"):
        resolve_compute_dtype("fp8", verbose=False)


def test_device_option_is_validated():
    assert ModelConfig(device="cuda:3").device == "cuda:3"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU0"):
        with pytest.raises(MlsaeError, match="--device must be"):
            ModelConfig(device=bad)


def _grads(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> tuple:
    sae.zero_grad(set_to_none=True)
    out = sae.train_step_forward(x, dead, k_aux=8, aux_coef=1 / 32)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}  # type: ignore[union-attr]
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_torch_path_equals_cpu_kernels(monkeypatch, one_thread, dtype):
    """Non-CPU tensors take plain torch ops (autograd does the backward): on CPU tensors with
    the custom kernels switched off, the same losses, codes and gradients."""
    torch.manual_seed(0)
    cfg = SaeConfig(d_in=32, expansion_factor=8, k=6, layers=[0, 1])
    sae = SparseAutoencoder(cfg, seed=3, compute_dtype=dtype)
    x = torch.randn(300, 32) * 3 + 1
    sae.init_b_dec(x)
    dead = torch.tensor([1, 5, 17, 40, 99, 200, 255])
    with torch.no_grad():
        enc_c = sae.encode(x)
        x_hat_c = sae.decode(enc_c)
    out_c, g_c = _grads(sae, x, dead)
    assert kernels.custom_path(sae.W_enc)
    monkeypatch.setattr(kernels, "CPU_KERNELS", False)
    assert not kernels.custom_path(sae.W_enc)
    with torch.no_grad():
        enc_p = sae.encode(x)
        x_hat_p = sae.decode(enc_p)
    out_p, g_p = _grads(sae, x, dead)
    # the same top-k values; the same latents (bf16 has ties, broken differently)
    torch.testing.assert_close(enc_p.top_acts.sort(1).values, enc_c.top_acts.sort(1).values)
    rows_same = (enc_c.top_indices.sort(1).values == enc_p.top_indices.sort(1).values).all(1)
    assert out_c.auxk.item() > 0
    if dtype == torch.bfloat16:
        assert rows_same.float().mean() > 0.9
        for a, b in ((out_p.fvu, out_c.fvu), (out_p.auxk, out_c.auxk)):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=0)
        return
    assert rows_same.all()
    torch.testing.assert_close(x_hat_p, x_hat_c, rtol=1e-5, atol=1e-5)
    for a, b in ((out_p.loss, out_c.loss), (out_p.fvu, out_c.fvu), (out_p.auxk, out_c.auxk)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for name in g_c:
        err = (g_p[name] - g_c[name]).abs().max() / g_c[name].abs().max()
        assert err < 1e-5, f"grad {name}: rel err {err}"


def test_plain_decode_dense_branch_equals_embedding_bag():
    """The scatter-matmul decode (MPS) against embedding_bag, values and gradients."""
    torch.manual_seed(0)
    w = torch.randn(64, 16, requires_grad=True)
    acts = torch.rand(10, 4, requires_grad=True)
    idx = torch.stack([torch.randperm(64)[:4] for _ in range(10)])
    a = kernels.plain_decode(acts, idx, w)
    z = torch.zeros(10, 64).scatter(1, idx, acts)
    b = z @ w  # reference from the definition
    torch.testing.assert_close(a, b)
    (a * torch.arange(16.0)).sum().backward()
    ga, gw = acts.grad.clone(), w.grad.clone()  # type: ignore[union-attr]
    acts.grad = w.grad = None
    (b * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(ga, acts.grad)
    torch.testing.assert_close(gw, w.grad)


def test_sae_device_and_geometric_median_on_cpu():
    sae = SparseAutoencoder(SaeConfig(d_in=8, expansion_factor=2, k=2), device="cpu")
    assert sae.device == torch.device("cpu")
    pts = torch.randn(50, 8)
    m = geometric_median(pts)
    assert m.dtype == pts.dtype and m.device == pts.device
    # Weiszfeld's fixed point: the unit vectors towards the points sum to ~0 at the median
    u = (pts - m.double().float()) / (pts - m).norm(dim=1, keepdim=True)
    assert u.sum(0).norm() < 1e-3 * len(pts)


def test_run_records_its_device_and_resume_may_move_it(tmp_path):
    import json

    from test_train import make_cache

    from mlsae.core.config import SaeGridConfig, SourceConfig, TrainConfig
    from mlsae.train.loop import train_command

    cache = make_cache(tmp_path / "c", n_tokens=512)
    out = train_command(
        tmp_path / "r",
        inputs=Inputs(source=SourceConfig(cache=cache), model=ModelConfig(device="cpu")),
        sae=SaeGridConfig(expansion_factor=[2], k=[2]),
        train=TrainConfig(batch_tokens=64, max_steps=2),
    )
    cfg = lambda: json.loads((out / "train_cfg.json").read_text())  # noqa: E731
    assert cfg()["model"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(MlsaeError, match="--device cuda: no CUDA device"):
            train_command(out, resume=True, device="cuda")
        assert cfg()["model"]["device"] == "cpu"  # a refused device changes nothing
    train_command(out, resume=True, train_given={"max_steps": 4}, device="auto")
    assert cfg()["model"]["device"] == "auto" and cfg()["train"]["max_steps"] == 4
