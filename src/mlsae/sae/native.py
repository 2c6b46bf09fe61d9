"""The native kernel backend: csrc/kernels.cpp compiled with the system C++ compiler at first
use and loaded with ctypes (plain C ABI over raw pointers, no torch headers: ~1-2 s to build).

Built once per (source, compiler, CPU flags) into `$MLSAE_CACHE/kernels/` (default
`~/.cache/mlsae/kernels/`) with `-O3 -march=native`, written to a temp file and renamed, so
concurrent first uses are safe. The backend is chosen by `MLSAE_KERNELS`:
  auto (default)  native if it builds and passes a self-test, else pure torch (logged)
  native          native, or MlsaeError if it cannot be built
  torch           pure torch (the fallback, no compiler needed)
`backend()` returns "native" or "torch" and logs the choice once, like the compute dtype.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
ABI_VERSION = 4
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread"]
OPENMP = ["-fopenmp"]
"""Tried first where torch runs on GNU OpenMP (`torch_libgomp`): the kernels then join the pool
of the libgomp torch has loaded (see kernels.cpp). Elsewhere (another OpenMP runtime, macOS, a
compiler without OpenMP) they start std::threads rather than load a second runtime."""
ENV = "MLSAE_KERNELS"

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "mlsae_abi_version": ([], _int),
    "mlsae_openmp": ([], _int),
    "mlsae_topk": ([_ptr, _int, _i64, _i64, _i64, _int, _ptr, _ptr, _ptr, _i64, _ptr, _int], None),
    "mlsae_row_dots": ([_ptr, _ptr, _i64, _int, _ptr, _i64, _ptr, _int], None),
    "mlsae_segments": ([_ptr, _i64, _int, _i64, _ptr, _ptr], _int),
    "mlsae_segment_sum": (
        [_ptr, _ptr, _int, _ptr, _ptr, _i64, _i64, _ptr, _int, _ptr, _int],
        None,
    ),
}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def torch_libgomp() -> bool:
    """Whether GNU OpenMP (libgomp) is loaded in this process, as torch's Linux wheels load it."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernels (if not cached) and return the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise MlsaeError("no C++ compiler (g++) found for the native kernels")
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise MlsaeError(f"cannot run the C++ compiler {cxx}: {e}") from None
    src = SOURCE.read_bytes()
    tries = [[*FLAGS, *OPENMP], FLAGS] if torch_libgomp() else [FLAGS]
    key = hashlib.sha256(
        b"\0".join([src, version.encode(), _cpu_flags().encode(), repr(tries).encode()])
    ).hexdigest()[:16]
    if cache_dir is None:
        from mlsae.data.model import cache_root

        cache_dir = cache_root() / "kernels"
    lib = cache_dir / f"mlsae_kernels-{key}.so"
    if lib.is_file():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        failures = []  # the last one is reported
        for flags in tries:
            res = subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600
            )
            if res.returncode == 0:
                break
            failures.append(res.stderr or res.stdout)
        else:
            msg = failures[-1].strip().splitlines()
            raise MlsaeError(f"building the native kernels failed: {' | '.join(msg[:3])}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(path: Path) -> ctypes.CDLL:
    """Open the library and declare its functions' signatures."""
    so = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, res
    if so.mlsae_abi_version() != ABI_VERSION:
        raise MlsaeError(f"{path}: unexpected kernel ABI version")
    return so


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native library per MLSAE_KERNELS, or None for the torch backend."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "native", "torch"):
        raise MlsaeError(f"{ENV} must be auto, native or torch, not {want!r}")
    if want == "torch":
        log.info("SAE kernels: torch (set by MLSAE_KERNELS)")
        return None
    try:
        so = load(build())
        _self_test(so)
    except (MlsaeError, OSError, AttributeError, AssertionError) as e:
        if want == "native":
            raise MlsaeError(f"native SAE kernels unavailable: {e}") from None
        log.warning(f"SAE kernels: torch (native kernels unavailable: {e})")
        return None
    pool = "OpenMP" if so.mlsae_openmp() else "std::thread"
    log.info(
        f"SAE kernels: native ({_compiler()} -march=native; {torch.get_num_threads()} threads, "
        f"{pool})"
    )
    return so


_FORCED_TORCH: list[bool] = [False]


def active() -> ctypes.CDLL | None:
    """The library the kernels use now: `library()`, or None inside `forced_torch()`."""
    return None if _FORCED_TORCH[0] else library()


class forced_torch:  # noqa: N801 - used like a function: `with forced_torch(): ...`
    """Context in which the kernels use the pure-torch backend (tests, benchmarks)."""

    def __enter__(self) -> None:
        self._old = _FORCED_TORCH[0]
        _FORCED_TORCH[0] = True

    def __exit__(self, *exc) -> None:
        _FORCED_TORCH[0] = self._old


def backend() -> str:
    """'native' or 'torch': the backend in use (resolved and logged once)."""
    return "native" if active() is not None else "torch"


def _self_test(so: ctypes.CDLL) -> None:
    """A tiny top-k and row-dots against torch, so a miscompiled library is never used."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(4, 40, generator=g)
    v, i = topk(pre, 5, so)
    assert torch.equal(v.sort(1).values, pre.topk(5).values.sort(1).values), "top-k self-test"
    grad, table = torch.randn(4, 3, generator=g), torch.randn(40, 3, generator=g)
    ref = (grad.unsqueeze(1) * table[i]).sum(2)
    assert torch.allclose(row_dots(grad, i, table, so), ref, atol=1e-5), "row-dots self-test"


# ----------------------------------------------------------------------------- wrappers


def _p(t: Tensor) -> int:
    return t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def topk(
    pre: Tensor,
    k: int,
    so: ctypes.CDLL,
    out: tuple[Tensor, Tensor] | None = None,
    cols: Tensor | None = None,
    cols_out: Tensor | None = None,
):
    """Row-wise top-k of pre [N, m] (fp32 or bf16, unit column stride) -> (vals f32 [N, k],
    idx i64 [N, k]) in no particular order; `out` (contiguous) receives them in place. With
    `cols` (i64 [c], each < m): also cols_out f32 [N, c] (contiguous) = pre[:, cols], gathered
    in the same pass."""
    if pre.dtype not in (torch.float32, torch.bfloat16) or pre.stride(1) != 1:
        pre = pre.float().contiguous()
    n, m = pre.shape
    vals, idx = (
        out if out is not None else (torch.empty(n, k), torch.empty(n, k, dtype=torch.int64))
    )
    nc, cp, gp = 0, None, None
    if cols is not None and cols.numel():
        assert cols_out is not None and cols_out.is_contiguous()
        assert cols_out.shape == (n, cols.numel()) and cols_out.dtype == torch.float32
        cols = cols.to(torch.int64).contiguous()
        if int(cols.min()) < 0 or int(cols.max()) >= m:
            raise IndexError(f"column ids must be in [0, {m})")
        nc, cp, gp = cols.numel(), _p(cols), _p(cols_out)
    if n and (k or nc):
        dt = 1 if pre.dtype == torch.bfloat16 else 0
        so.mlsae_topk(
            _p(pre), dt, n, m, pre.stride(0), k, _p(vals), _p(idx), cp, nc, gp, _threads()
        )
    return vals, idx


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def row_dots(g: Tensor, idx: Tensor, table: Tensor, so: ctypes.CDLL) -> Tensor:
    """out[n, s] = g[n] . table[idx[n, s]]: [N, k] float32."""
    g, idx, table = _f32(g), idx.to(torch.int64).contiguous(), _f32(table)
    n, k = idx.shape
    out = torch.empty(n, k)
    so.mlsae_row_dots(_p(g), _p(idx), n, k, _p(table), table.shape[1], _p(out), _threads())
    return out


def segments(idx: Tensor, m: int, so: ctypes.CDLL) -> tuple[Tensor, Tensor]:
    """Counting sort of idx [N, k] by latent: (offsets i64 [m + 1], order i64 [N*k])."""
    idx = idx.to(torch.int64).contiguous()
    n, k = idx.shape
    offsets, order = torch.empty(m + 1, dtype=torch.int64), torch.empty(n * k, dtype=torch.int64)
    if so.mlsae_segments(_p(idx), n, k, m, _p(offsets), _p(order)) != 0:
        raise MlsaeError(f"latent index out of range [0, {m})")
    return offsets, order


def segment_sum(
    offsets: Tensor,
    order: Tensor,
    k: int,
    w: Tensor,
    table: Tensor,
    so: ctypes.CDLL,
    transposed: bool = False,
) -> tuple[Tensor, Tensor]:
    """out[j] = sum over entries e of latent j of w[e] * table[e // k]: [m, d], or [d, m] if
    transposed; and the sums of w per latent [m]. w: [N, k] per entry."""
    w, table = _f32(w), _f32(table)
    m, d = offsets.numel() - 1, table.shape[1]
    out = torch.empty((d, m) if transposed else (m, d))
    cs = torch.empty(m)
    so.mlsae_segment_sum(
        _p(offsets),
        _p(order),
        k,
        _p(w),
        _p(table),
        m,
        d,
        _p(out),
        int(transposed),
        _p(cs),
        _threads(),
    )
    return out, cs
