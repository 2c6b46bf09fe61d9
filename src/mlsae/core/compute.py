"""Choosing the compute dtype for this CPU.

bf16 matmul is 5-7x faster than fp32 on Intel CPUs with AMX, but ~100x slower on AVX2-only
CPUs. So the dtype is never hard-coded: `auto` picks bf16 only where the CPU reports AMX
(or a CUDA device is used), and prints the choice once.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch

log = logging.getLogger(__name__)

DtypeName = Literal["auto", "float32", "bfloat16"]


@functools.cache
def cpu_capability() -> str:
    """torch's name for the best SIMD level it dispatches to, e.g. 'AVX2', 'AVX512', 'AMX'."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def has_fast_bf16() -> bool:
    """True where bf16 matmul is native (Intel AMX); False on AVX2/AVX512-without-AMX."""
    if torch.cuda.is_available():
        return True
    cap = cpu_capability().upper()
    if "AMX" in cap:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def resolve_compute_dtype(name: DtypeName | str = "auto", verbose: bool = True) -> torch.dtype:
    """Map a user setting to a torch dtype; `auto` = bf16 where it is fast, else fp32."""
    if name == "float32":
        dtype = torch.float32
    elif name == "bfloat16":
        dtype = torch.bfloat16
    elif name == "auto":
        dtype = torch.bfloat16 if has_fast_bf16() else torch.float32
    else:
        from mlsae.core.errors import MlsaeError

        raise MlsaeError(f"unknown compute dtype {name!r} (auto, float32, bfloat16)")
    if verbose:
        _announce(name, dtype)
    return dtype


@functools.cache
def _announce(name: str, dtype: torch.dtype) -> None:
    log.info(f"CPU capability {cpu_capability()}; compute dtype {dtype} (setting: {name})")
