"""Intra-op threads for work that a second thread only slows down (used by evolution and the
explorer)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the sparse statistics on one intra-op thread: they are scatter / element-wise passes
    that gain nothing from a second thread and lose a lot to thread synchronisation on a busy
    machine (measured 4x slower with 2 threads under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
