"""`mlsae cache`: run the model over the corpus and write an activation cache
(text -> tokens -> activations; the format is in cache.py). Optionally through a tuned lens
(SPEC 5): the cache then holds T_l(x[t,l]) and its manifest names the lens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mlsae.activations.cache import _OURS, MANIFEST, CacheWriter, _sha256_file
from mlsae.activations.live import LiveSource
from mlsae.activations.manifest import FORMAT, Manifest, ShardEntry, shard_name
from mlsae.activations.norms import NormOutliers
from mlsae.core.config import ExtractConfig
from mlsae.core.dist import Comm
from mlsae.core.errors import Interrupted, MlsaeError
from mlsae.core.inputs import Inputs
from mlsae.core.io import read_json, write_json
from mlsae.core.lock import LOCK, folder_lock
from mlsae.core.outputs import check_output, check_writable
from mlsae.core.schema import from_dict
from mlsae.data.text import txt_documents_of

log = logging.getLogger(__name__)


def _existing(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier run of the same command in `out` (None: `out` is absent or
    holds only our files); MlsaeError for a foreign folder or other arguments. Reads only."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a new --out")
    man = out / MANIFEST
    if not man.is_file():
        if any(not _OURS.match(p.name) for p in out.iterdir()):
            raise MlsaeError(f"{out} exists and is not an activation cache: choose a new --out")
        return None
    try:
        m = read_json(man, "manifest")
    except MlsaeError:
        m = None
    if (
        not isinstance(m, dict)
        or m.get("format") != FORMAT
        or not isinstance(m.get("shards"), list)
        or not all(isinstance(s, dict) for s in m["shards"])
    ):
        raise MlsaeError(f"{out} holds an unreadable or foreign manifest: choose a new --out")
    diff = [f"{k}: {m.get(k)!r} -> {v!r}" for k, v in settings.items() if m.get(k) != v]
    if diff:
        raise MlsaeError(
            f"{out} holds a cache made with other arguments ({'; '.join(diff)}): "
            "choose a new --out (the existing cache is left untouched)"
        )
    return m


def _resume_point(out: Path, settings: dict[str, Any], contexts: Tensor, per_shard: int) -> Any:
    """Verified shards of an earlier run of the same command (list of `ShardEntry`), the
    finished manifest (dict) if it completed with every shard intact, or None for a fresh start.
    Never touches a foreign folder."""
    m = _existing(out, settings)
    if m is None:
        for p in out.iterdir() if out.is_dir() else []:
            if p.name != LOCK:
                p.unlink()
        return None
    if m.get("complete") is True:
        bad = [s.get("name") for s in m["shards"] if not _intact(out, s)]
        if not bad:
            return m
        log.warning(f"{out} is complete but shard(s) {bad} are damaged: rewriting them")
    ctx, good = contexts.shape[1], []
    for i, s in enumerate(m["shards"]):
        path = out / str(s.get("name"))
        c0 = i * per_shard
        want = contexts[c0 : c0 + per_shard].reshape(-1)
        try:
            entry = from_dict(ShardEntry, s, f"{out / MANIFEST}: shard {i}")
            ok = entry.name == shard_name(i) and entry.n_tokens == want.numel()
            ok = ok and _sha256_file(path) == entry.sha256
            with safe_open(path, framework="pt") as f:
                ok = ok and torch.equal(f.get_tensor("token_ids"), want)
        except Exception:
            break
        if not ok or want.numel() < per_shard * ctx:  # a short shard is only ever the last
            break
        good.append(entry)
    keep = {s.name for s in good} | {MANIFEST, LOCK}
    for p in out.iterdir():
        if _OURS.match(p.name) and p.name not in keep:
            p.unlink()
    return good


def _intact(out: Path, entry: dict[str, Any]) -> bool:
    """Whether a shard file exists and matches its manifest entry's sha256."""
    try:
        return isinstance(entry, dict) and _sha256_file(out / str(entry["name"])) == entry["sha256"]
    except (OSError, KeyError):
        return False


def open_cache_source(
    inputs: Inputs,
    extract: ExtractConfig | None = None,
    lens: str | Path | None = None,
) -> LiveSource:
    """The model on the data, as `build_cache` reads it (a block is exactly one shard)."""
    from mlsae.activations.open import open_live

    extract = extract or ExtractConfig()
    if inputs.source.tokens is None:
        raise MlsaeError("give --tokens: how many tokens to cache")
    per_shard = max(1, extract.shard_tokens // inputs.data.context_length)  # contexts per shard
    return open_live(
        inputs,
        default_tokens=inputs.source.tokens,
        lens=lens,
        storage_dtype=extract.storage_dtype,
        block_tokens=per_shard * inputs.data.context_length,
    )


@dataclass
class BuiltCache:
    """What `build_cache` wrote: the cache folder, its manifest and the norm-outlier report
    recorded in it."""

    path: Path
    manifest: Manifest
    norm_outliers: NormOutliers | None


def build_cache(
    out: str | Path,
    inputs: Inputs,
    extract: ExtractConfig | None = None,
    lens: str | Path | None = None,
) -> BuiltCache:
    """`mlsae cache`: capture the chosen blocks' outputs for `inputs.source.tokens` tokens
    (rounded up to whole contexts) of `inputs.data` into `out`, through the tuned `lens` if
    given (the cache then holds T_l(x)); resumes an interrupted run of the same command, and
    rewrites the damaged shards of a complete one. The output location is checked (kind,
    writable, room for the cache) before the model loads. Launched by torchrun with several
    processes, they share the shards (`extract_parallel`). Returns what was written (on every
    process)."""
    from mlsae.core.compute import resolve_device
    from mlsae.core.dist import session

    with session(resolve_device(inputs.model.device)) as comm:
        man = _build(comm, out, inputs, extract, lens)
    rep = man.get("norm_outliers")
    return BuiltCache(
        Path(out),
        from_dict(Manifest, man, str(Path(out) / MANIFEST)),
        NormOutliers.from_summary(rep) if isinstance(rep, dict) else None,
    )


def _build(
    comm: Comm,
    out: str | Path,
    inputs: Inputs,
    extract: ExtractConfig | None,
    lens: str | Path | None,
) -> dict[str, Any]:
    source, data = inputs.source, inputs.data
    extract = extract or ExtractConfig()
    if source.tokens is None:
        raise MlsaeError("give --tokens: how many tokens to cache")
    out = Path(out)
    check_output(out, "cache", inputs=[lens])
    ctx = data.context_length
    per_shard = max(1, extract.shard_tokens // ctx)  # contexts per shard
    live = open_cache_source(inputs, extract, lens)
    contexts = live.contexts()  # [n_ctx, ctx]: too few tokens fails here, before any write
    settings = {
        **{
            k: live.info[k]
            for k in (
                "model",
                "model_dtype",
                "dataset",
                "split",
                "text_column",
                "hf_split",
                "test_fraction",
                "context_length",
                "layers",
                "d_model",
                "dtype",
                "lens",
                "exclude_sink",
            )
        },
        "txt_documents": txt_documents_of(data),
        "requested_tokens": source.tokens,
        "target_tokens": live.n_contexts * ctx,
        "shard_tokens": per_shard * ctx,
    }
    meta = {k: v for k, v in settings.items() if k not in ("dtype", "shard_tokens")}
    meta["special_ids"] = list(live.lm.special_ids)
    _existing(out, settings)  # a foreign folder or other arguments: refused before any write
    itemsize = 2 if extract.storage_dtype == "bfloat16" else 4
    size = live.n_contexts * ctx * (len(live.layers) * live.d_model * itemsize + 9)
    have = sum(p.stat().st_size for p in out.glob("shard_*.safetensors")) if out.is_dir() else 0
    check_writable(out, f"--out {out}", need_bytes=max(0, size - have))
    if comm.world > 1:
        from mlsae.activations.extract_parallel import build_parallel

        man = build_parallel(comm, out, live, settings, meta, extract.storage_dtype, _resume_point)
        if "norm_outliers" not in man:  # rank 0 adds it; every process returns one manifest
            if comm.main:
                record_norm_outliers(out)
            man = comm.broadcast_object(read_json(out / MANIFEST) if comm.main else None)
        return man
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "activation cache"):
        return _write(out, live, settings, meta, contexts, extract)


def _write(
    out: Path,
    live: LiveSource,
    settings: dict[str, Any],
    meta: dict[str, Any],
    contexts: Tensor,
    extract: ExtractConfig,
) -> dict[str, Any]:
    """The writing part of `build_cache` (under the folder's lock)."""
    from tqdm import tqdm

    ctx = contexts.shape[1]
    per_shard = int(settings["shard_tokens"]) // ctx
    done = _resume_point(out, settings, contexts, per_shard)
    if isinstance(done, dict):
        log.info(f"{out} is already complete ({done['n_tokens']} tokens)")
        return done
    writer = CacheWriter(out, meta, per_shard * ctx, extract.storage_dtype, shards=done or [])
    start = len(done or [])
    if start:
        log.info(f"resuming {out} after {start * per_shard * ctx} tokens")
    bar = tqdm(
        total=live.n_tokens,
        initial=start * per_shard * ctx,
        unit="tok",
        unit_scale=True,
        desc="cache",
    )
    try:
        with bar:
            for i in range(start, live.n_blocks):  # a block is exactly one shard
                b = live.load_block(i)
                writer.add(b.activations, b.token_ids, b.mask)
                bar.update(len(b.token_ids))
    except Interrupted as e:
        raise Interrupted(
            e.signum,
            f"stopped by signal {e.signum}: {writer.manifest['n_tokens']} "
            f"tokens of {out} are saved; run the same command again to resume "
            "it",
        ) from None
    writer.close()
    record_norm_outliers(out)
    return read_json(out / MANIFEST, "manifest")


def record_norm_outliers(out: Path) -> NormOutliers:
    """Add the per-layer norm-outlier report (mlsae.activations.norms) to a finished cache's
    manifest; returns the report."""
    from mlsae.activations.cache import ActivationCache
    from mlsae.activations.norms import norm_outliers

    cache = ActivationCache(out)
    rep = norm_outliers(cache)
    log.info(f"{out}: {rep.describe()}")
    man = {**cache.manifest, "norm_outliers": rep.summary()}
    write_json(out / MANIFEST, man)
    return rep
