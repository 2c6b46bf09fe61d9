"""How much memory this machine can still give, and a check that refuses work which would not
fit with the numbers, instead of dying in an allocation traceback half-way."""

from __future__ import annotations

import logging
from pathlib import Path

from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def available_bytes() -> int | None:
    """Memory available to this process now: MemAvailable (/proc/meminfo), lowered to the room
    left under a cgroup v2 memory limit if there is one; None where neither is readable."""
    avail = None
    info = _read("/proc/meminfo")
    for line in (info or "").splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    limit, used = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit and limit.isdigit() and used and used.isdigit():
        room = max(0, int(limit) - int(used))
        avail = room if avail is None else min(avail, room)
    return avail


def gb(n: float) -> str:
    """Bytes as 'N.N GB' (or MB below 1 GB)."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_memory(need: int, what: str, hint: str, available: int | None = None) -> None:
    """MlsaeError if `need` bytes exceed the available memory: '{what} need(s) about N GB ...
    this machine has M GB available: {hint}'."""
    avail = available_bytes() if available is None else available
    if avail is None:
        return
    if need > avail:
        raise MlsaeError(
            f"{what} need about {gb(need)} of memory and this machine has "
            f"{gb(avail)} available: {hint}"
        )
    log.debug(f"{what}: about {gb(need)} of {gb(avail)} available")
