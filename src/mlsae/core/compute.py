"""Choosing the device and the compute dtype.

Device (`--device`): auto = the first of cuda (under torchrun: this process's GPU,
cuda:LOCAL_RANK), mps, cpu that is available; an explicit device that is not available is an
error, never a silent fallback.

Compute dtype (`--compute-dtype`, the SAE encoder's matmul): never hard-coded, decided per
device by `auto`:
- CUDA: bf16 where the GPU supports it (compute capability >= 8.0: Ampere and later, where
  float32 matmuls also run as TF32), else float32.
- CPU: measured, not read from CPU flags (bf16 matmuls are 5-7x fp32 with AMX, 2-2.7x on Zen 4,
  ~100x slower on AVX2-only CPUs): a short calibration at first use, cached per CPU model and
  torch version (`mlsae.core.calibrate`); bf16 only where clearly faster.
- MPS: float32.
The choice is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch

from mlsae.core.calibrate import StepProbe, cpu_calibration
from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "float32", "bfloat16"]


@functools.cache
def cpu_capability() -> str:
    """torch's name for the best SIMD level it dispatches to, e.g. 'AVX2', 'AVX512', 'AMX'."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device of a --device value (see the module docstring); MlsaeError if it is
    not available here."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local % max(1, torch.cuda.device_count()))
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise MlsaeError("--device mps: Apple's MPS backend is not available here")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MlsaeError(f"--device {name}: no CUDA device (torch {torch.__version__})")
        n = torch.cuda.device_count()
        try:
            index = local if name == "cuda" else int(name.split(":", 1)[1])
        except ValueError:
            raise MlsaeError(f"--device {name}: not a device (cuda:N)") from None
        if not 0 <= index < n:
            raise MlsaeError(f"--device {name}: this machine has {n} CUDA device(s)")
        return torch.device("cuda", index)
    raise MlsaeError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")


def cuda_bf16(device: torch.device) -> bool:
    """True on CUDA devices of compute capability >= 8.0 (native bf16 and TF32)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def has_fast_bf16(
    device: torch.device | str | None = None,
    shape: tuple[int, int] = (576, 4608),
    probe: StepProbe | None = None,
) -> bool:
    """True where bf16 is clearly faster on `device` (default cpu): CUDA GPUs of capability
    >= 8.0; CPUs where the calibration (for SAE inputs of width d and d_sae m = `shape`, with
    SAE steps timed by `probe` where given) measured it so."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        return cuda_bf16(dev)
    if dev.type == "cpu":
        return cpu_calibration(*shape, probe=probe).choice == "bfloat16"
    return False


def resolve_compute_dtype(
    name: DtypeName | str = "auto",
    verbose: bool = True,
    device: torch.device | str | None = None,
    shape: tuple[int, int] = (576, 4608),
    probe: StepProbe | None = None,
) -> torch.dtype:
    """Map a user setting to a torch dtype for `device` (default cpu): `auto` = bf16 where it
    is clearly faster there (`has_fast_bf16`), else fp32. On CUDA GPUs with TF32, float32
    matmuls are allowed to use it."""
    dev = torch.device(device or "cpu")
    if name == "float32":
        dtype = torch.float32
    elif name == "bfloat16":
        dtype = torch.bfloat16
    elif name == "auto":
        dtype = torch.bfloat16 if has_fast_bf16(dev, shape, probe) else torch.float32
    else:
        raise MlsaeError(f"unknown compute dtype {name!r} (auto, float32, bfloat16)")
    if cuda_bf16(dev):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if verbose:
        _announce(str(name), dtype, str(dev))
    return dtype


def describe_device(device: torch.device) -> str:
    """One line naming the device: the GPU's name, or the CPU's SIMD level and threads."""
    if device.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        tf32 = ", TF32 matmuls" if cuda_bf16(device) else ""
        return f"{device} ({torch.cuda.get_device_name(device)}, capability {cap}{tf32})"
    if device.type == "cpu":
        return f"cpu ({cpu_capability()}, {torch.get_num_threads()} torch threads)"
    return str(device)


@functools.cache
def _announce(name: str, dtype: torch.dtype, device: str) -> None:
    how = f"setting: {name}"
    if name == "auto" and device == "cpu":
        how = f"auto: {cpu_calibration().summary()}; override with --compute-dtype"
    log.info(f"device {describe_device(torch.device(device))}; compute dtype {dtype} ({how})")
