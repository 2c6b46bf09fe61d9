"""`mlsae cache` on several processes (torchrun / `--nproc N`): one cache, its shards written by
every process, one manifest.

Shard i is the live source's block i (the same as a one-process `mlsae cache` writes); after a
resume point, process r writes shards start + r, start + r + N, ... Each round of N shards ends
with their manifest entries gathered to rank 0, which alone writes `manifest.json` (after every
round, so an interrupted run resumes like a one-process one). The folder must be on a disk that
every process sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlsae.activations.cache import CacheWriter, write_shard
from mlsae.activations.live import LiveSource
from mlsae.core.dist import Comm
from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)


def build_parallel(
    comm: Comm,
    out: Path,
    live: LiveSource,
    settings: dict[str, Any],
    meta: dict[str, Any],
    storage_dtype: str,
    resume_point: Callable[..., Any],
) -> dict[str, Any]:
    """Write the cache of `live` into `out` with every process of `comm`; returns the manifest
    (on every process). `resume_point`: extract._resume_point (rank 0 checks the folder)."""
    from tqdm import tqdm

    shard_tokens = int(settings["shard_tokens"])
    per_shard = shard_tokens // live.context_length
    msg: dict[str, Any] = {}
    if comm.main:
        try:
            msg = {"done": resume_point(out, settings, live.contexts(), per_shard)}
        except MlsaeError as e:
            comm.broadcast_object({"error": str(e)})
            raise
    got = comm.broadcast_object(msg)
    if "error" in got:
        raise MlsaeError(f"rank 0: {got['error']}")
    done = got["done"]
    if isinstance(done, dict):
        return done
    writer = None
    if comm.main:
        writer = CacheWriter(out, meta, shard_tokens, storage_dtype, shards=done or [])
    comm.barrier()  # the folder exists before anyone writes into it
    todo = list(range(len(done or []), live.n_blocks))
    bar = tqdm(
        total=len(todo), unit="shard", desc=f"cache ({comm.world} processes)", disable=not comm.main
    )
    with bar:
        for r0 in range(0, len(todo), comm.world):
            mine = r0 + comm.rank
            entry = None
            if mine < len(todo):
                b = live.load_block(todo[mine])
                entry = write_shard(
                    out,
                    todo[mine],
                    b.activations,
                    b.token_ids,
                    b.mask,
                    writer.dtype if writer else live.dtype,
                )
            entries = comm.gather_objects(entry)
            if writer is not None:
                for e in entries:
                    if e is not None:
                        writer.add_shard(e)
            bar.update(sum(e is not None for e in entries))
    return comm.broadcast_object(writer.close() if writer is not None else None)
