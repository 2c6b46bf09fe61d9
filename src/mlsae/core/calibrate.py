"""The CPU's compute dtype for `--compute-dtype auto`, chosen by measurement, not CPU flags.

bf16 matmuls are 5-7x fp32 on Intel AMX CPUs, 2.1-2.7x on AMD Zen 4 (avx512_bf16, as issue 30
reports) and about 100x slower on AVX2-only CPUs; no flag tells which. At first use `auto` times,
interleaved, in this order:
 1. a quick probe: one fp32 and one bf16 matmul of PROBE_ROWS rows and (at most) PROBE_COLS
    latents of the step's shape (after a warm-up call each); bf16 more than PROBE_REJECT x slower ends it with fp32 (well under a
    second even where bf16 is 100x slow);
 2. else matmuls of MATMUL_ROWS rows of the step's shape, best of REPEATS in each dtype, and,
    when the caller gives a step probe (training does: `mlsae.train.member.step_probe`),
    REPEATS SAE training steps of STEP_ROWS vectors in each dtype.
bf16 is chosen only where every ratio measured (fp32 time / bf16 time, best of the repeats) is
at least BF16_MARGIN; a calibration cut short by BUDGET_S seconds of measured time chooses fp32.

The result is cached per CPU model and torch version in
`$MLSAE_CACHE/calibration/compute-<key>.json` (default `~/.cache/mlsae`), read back through the
schema check (a damaged file is measured again and replaced, atomically), and logged with the
timings behind the choice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1
"""Bumped when the measurement changes: older cache files are measured again."""
BF16_MARGIN = 1.3
"""bf16 only where it is at least this much faster (fp32 time / bf16 time) in every measurement:
well clear of run-to-run noise on a loaded machine (10-20%), well below bf16's gain where it is
native (Zen 4: a 1.61x step, 2.1-2.7x matmul; AMX: 5-7x)."""
PROBE_REJECT = 2.0
"""The quick probe ends the calibration with fp32 where bf16 is more than this much slower."""
PROBE_ROWS = 32
PROBE_COLS = 1024
MATMUL_ROWS = 256
STEP_ROWS = 512
REPEATS = 3
BUDGET_S = 2.0
"""Measured seconds after which the calibration stops and chooses fp32."""
MAX_LATENTS = 16384
"""Wider dictionaries are timed on their first MAX_LATENTS columns (the ratio is what counts)."""

Stage = Literal["probe", "matmul", "steps", "budget"]
StepProbe = Callable[[torch.dtype, int], Callable[[], object]]
"""(dtype, rows) -> one SAE training step on `rows` vectors in that compute dtype."""
Timer = Callable[[str, torch.dtype, Callable[[], object]], float]
"""(what, dtype, fn) -> seconds of one call of fn (tests fake it)."""


@dataclass
class Calibration:
    """What the calibration measured on this CPU and what it chose."""

    cpu: str
    torch: str
    threads: int
    shape: list[int]
    """[d_in, d_sae] of the timed matmuls and steps."""
    choice: Literal["float32", "bfloat16"]
    stage: Stage
    """How far it got: probe (bf16 rejected at once), matmul (no step probe given), steps, or
    budget (cut short)."""
    probe_ms: list[float]
    """[fp32, bf16] ms of the quick probe."""
    matmul_ms: list[float] | None = None
    """[fp32, bf16] best ms of MATMUL_ROWS-row matmuls."""
    step_ms: list[float] | None = None
    """[fp32, bf16] best ms of STEP_ROWS-vector SAE steps."""
    seconds: float = 0.0
    version: int = CALIBRATION_VERSION

    def summary(self) -> str:
        """One line: the choice and the timings behind it."""

        def ratio(ms: list[float] | None, what: str) -> str:
            return f", {what} bf16 {ms[0] / ms[1]:.2f}x fp32" if ms else ""

        return (
            f"{self.choice} (measured on {self.cpu}: probe bf16 {self.probe_ms[0] / self.probe_ms[1]:.2f}x "
            f"fp32{ratio(self.matmul_ms, 'matmul')}{ratio(self.step_ms, 'SAE step')}; bf16 only "
            f"from {BF16_MARGIN}x; {self.stage}, {self.seconds:.2f} s)"
        )


def cache_root() -> Path:
    """`$MLSAE_CACHE` or `~/.cache/mlsae`."""
    return Path(os.environ.get("MLSAE_CACHE") or Path.home() / ".cache" / "mlsae").expanduser()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> Path:
    """This CPU model's and torch version's calibration file."""
    key = hashlib.sha256(f"{cpu_name()}|{torch.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "calibration" / f"compute-{key}.json"


def decide(
    probe_ms: list[float], matmul_ms: list[float] | None, step_ms: list[float] | None
) -> Literal["float32", "bfloat16"]:
    """bf16 only where every measured fp32/bf16 ratio is >= BF16_MARGIN and the matmul was
    measured (the quick probe alone never chooses bf16)."""
    if matmul_ms is None:
        return "float32"
    ratios = [ms[0] / ms[1] for ms in (matmul_ms, step_ms) if ms is not None]
    return "bfloat16" if min(ratios) >= BF16_MARGIN else "float32"


def _time_once(what: str, dtype: torch.dtype, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _matmul(rows: int, d: int, m: int, dtype: torch.dtype) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(dtype)
    w = torch.randn(d, m, generator=gen).to(dtype)
    b = torch.zeros(m, dtype=dtype)
    return lambda: torch.addmm(b, x, w)


def measure(
    d: int, m: int, probe: StepProbe | None = None, timer: Timer = _time_once
) -> Calibration:
    """Run the calibration (module docstring) for SAE inputs of width d and d_sae m."""
    m = min(m, MAX_LATENTS)
    dts = (torch.float32, torch.bfloat16)
    spent = 0.0

    def best(what: str, fns: list[Callable[[], object]], repeats: int) -> list[float] | None:
        """Best ms of `repeats` timed calls per dtype after a warm-up each, interleaved; None
        when the budget runs out."""
        nonlocal spent
        times: list[list[float]] = [[], []]
        for rep in range(repeats + 1):
            for i, fn in enumerate(fns):
                s = timer(what, dts[i], fn)
                spent += s
                if rep:
                    times[i].append(s * 1e3)
                if spent > BUDGET_S:
                    return None
        return [min(t) for t in times]

    def result(
        stage: Stage,
        probe_ms: list[float],
        mm: list[float] | None = None,
        st: list[float] | None = None,
    ) -> Calibration:
        choice: Literal["float32", "bfloat16"]
        choice = "float32" if stage == "budget" else decide(probe_ms, mm, st)
        return Calibration(
            cpu_name(),
            torch.__version__,
            torch.get_num_threads(),
            [d, m],
            choice,
            stage,
            probe_ms,
            mm,
            st,
            round(spent, 3),
        )

    probe_ms = best("probe", [_matmul(PROBE_ROWS, d, min(m, PROBE_COLS), dt) for dt in dts], 1)
    if probe_ms is None:
        return result("budget", [float("nan")] * 2)
    if probe_ms[1] > PROBE_REJECT * probe_ms[0]:
        return result("probe", probe_ms)
    mm = best("matmul", [_matmul(MATMUL_ROWS, d, m, dt) for dt in dts], REPEATS)
    if mm is None:
        return result("budget", probe_ms)
    if probe is None or decide(probe_ms, mm, None) == "float32":
        return result("matmul", probe_ms, mm)
    st = best("step", [probe(dt, STEP_ROWS) for dt in dts], REPEATS)
    return result("budget", probe_ms, mm) if st is None else result("steps", probe_ms, mm, st)


_MEMO: dict[bool, Calibration] = {}
"""This process's calibration, by whether it timed SAE steps."""


def _usable(cal: Calibration, probe: StepProbe | None) -> bool:
    """A cached result answers this call: the same measurement version, and SAE steps timed
    where the caller can time them (unless bf16 was already out at the matmul)."""
    if cal.version != CALIBRATION_VERSION or cal.torch != torch.__version__:
        return False
    return probe is None or cal.stage != "matmul" or cal.choice == "float32"


def _read_cached(path: Path) -> Calibration | None:
    from mlsae.core.io import read_json_object
    from mlsae.core.schema import from_dict

    if not path.exists():
        return None
    try:
        return from_dict(Calibration, read_json_object(path, "calibration file"), path.name)
    except MlsaeError as e:
        log.warning(f"{e}: measuring the compute dtype again")
        return None


def cpu_calibration(d: int = 576, m: int = 4608, probe: StepProbe | None = None) -> Calibration:
    """This CPU's calibration: from this process, else the cache file, else measured now (and
    cached; a cache folder that cannot be written is logged, not an error)."""
    from mlsae.core.io import write_json
    from mlsae.core.schema import to_dict

    for key in (True, False):
        if key in _MEMO and _usable(_MEMO[key], probe):
            return _MEMO[key]
    path = cache_path()
    cal = _read_cached(path)
    if cal is None or not _usable(cal, probe):
        log.info("measuring bf16 against fp32 on this CPU (once per CPU model and torch version)")
        cal = measure(d, m, probe)
        try:
            write_json(path, to_dict(cal))
        except (OSError, MlsaeError) as e:
            log.warning(f"could not cache the compute-dtype calibration in {path}: {e}")
    _MEMO[cal.stage == "steps"] = cal
    return cal
