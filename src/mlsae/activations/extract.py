"""`mlsae cache`: run the model over the corpus and write an activation cache
(text -> tokens -> activations; the format is in cache.py). Optionally through a tuned lens
(SPEC 5): the cache then holds T_l(x[t,l]) and its manifest names the lens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mlsae.activations.cache import (
    _OURS,
    FORMAT,
    MANIFEST,
    CacheWriter,
    _sha256_file,
    shard_name,
)
from mlsae.core.config import DataConfig, ExtractConfig, ModelConfig, SourceConfig
from mlsae.core.dist import Comm
from mlsae.core.errors import MlsaeError

log = logging.getLogger(__name__)


def _resume_point(out: Path, settings: dict[str, Any], contexts: Tensor, per_shard: int) -> Any:
    """Verified shards of an earlier run of the same command (list), the finished manifest
    (dict) if it completed, or None for a fresh start. Never touches a foreign folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a new --out")
    man = out / MANIFEST
    if not man.is_file():
        if any(not _OURS.match(p.name) for p in out.iterdir()):
            raise MlsaeError(f"{out} exists and is not an activation cache: choose a new --out")
        for p in out.iterdir():
            p.unlink()
        return None
    try:
        m = json.loads(man.read_text())
    except (OSError, ValueError):
        m = None
    if (
        not isinstance(m, dict)
        or m.get("format") != FORMAT
        or not isinstance(m.get("shards"), list)
    ):
        raise MlsaeError(f"{out} holds an unreadable or foreign manifest: choose a new --out")
    diff = [f"{k}: {m.get(k)!r} -> {v!r}" for k, v in settings.items() if m.get(k) != v]
    if diff:
        raise MlsaeError(
            f"{out} holds a cache made with other arguments ({'; '.join(diff)}): "
            "choose a new --out (the existing cache is left untouched)"
        )
    if m.get("complete") is True:
        return m
    ctx, good = contexts.shape[1], []
    for i, s in enumerate(m["shards"]):
        path = out / str(s.get("name"))
        c0 = i * per_shard
        want = contexts[c0 : c0 + per_shard].reshape(-1)
        try:
            ok = s["name"] == shard_name(i) and int(s["n_tokens"]) == want.numel()
            ok = ok and _sha256_file(path) == s["sha256"]
            with safe_open(path, framework="pt") as f:
                ok = ok and torch.equal(f.get_tensor("token_ids"), want)
        except Exception:
            ok = False
        if not ok or want.numel() < per_shard * ctx:  # a short shard is only ever the last
            break
        good.append(s)
    keep = {s["name"] for s in good} | {MANIFEST}
    for p in out.iterdir():
        if _OURS.match(p.name) and p.name not in keep:
            p.unlink()
    return good


def build_cache(
    out: str | Path,
    model: ModelConfig,
    data: DataConfig,
    source: SourceConfig,
    extract: ExtractConfig | None = None,
    lens: str | Path | None = None,
) -> dict[str, Any]:
    """`mlsae cache`: capture the chosen blocks' outputs for `source.tokens` tokens (rounded up
    to whole contexts) of `data` into `out`, through the tuned `lens` if given (the cache then
    holds T_l(x)); resumes an interrupted run of the same command. Launched by torchrun with
    several processes, they share the shards (`extract_parallel`). Returns the manifest."""
    from mlsae.core.compute import resolve_device
    from mlsae.core.dist import session

    with session(resolve_device(model.device)) as comm:
        return _build(comm, out, model, data, source, extract, lens)


def _build(
    comm: Comm,
    out: str | Path,
    model: ModelConfig,
    data: DataConfig,
    source: SourceConfig,
    extract: ExtractConfig | None,
    lens: str | Path | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    from mlsae.activations.open import open_live

    extract = extract or ExtractConfig()
    if source.tokens is None:
        raise MlsaeError("give --tokens: how many tokens to cache")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a new --out")
    ctx = data.context_length
    per_shard = max(1, extract.shard_tokens // ctx)  # contexts per shard
    live = open_live(source, data, model, default_tokens=source.tokens, lens=lens,
                     storage_dtype=extract.storage_dtype, block_tokens=per_shard * ctx)  # fmt: skip
    settings = {
        **{k: live.info[k] for k in ("model", "model_dtype", "dataset", "split", "text_column",
                                     "hf_split", "test_fraction", "context_length", "layers",
                                     "d_model", "dtype", "lens")},
        "requested_tokens": source.tokens, "target_tokens": live.n_contexts * ctx,
        "shard_tokens": per_shard * ctx,
    }  # fmt: skip
    meta = {k: v for k, v in settings.items() if k not in ("dtype", "shard_tokens")}
    meta["special_ids"] = list(live.lm.special_ids)
    if comm.world > 1:
        from mlsae.activations.extract_parallel import build_parallel

        return build_parallel(comm, out, live, settings, meta, extract.storage_dtype, _resume_point)
    done = _resume_point(out, settings, live.contexts(), per_shard)
    if isinstance(done, dict):
        log.info(f"{out} is already complete ({done['n_tokens']} tokens)")
        return done
    writer = CacheWriter(out, meta, per_shard * ctx, extract.storage_dtype, shards=done or [])
    start = len(done or [])
    if start:
        log.info(f"resuming {out} after {start * per_shard * ctx} tokens")
    bar = tqdm(total=live.n_tokens, initial=start * per_shard * ctx, unit="tok", unit_scale=True,
               desc="cache")  # fmt: skip
    with bar:
        for i in range(start, live.n_blocks):  # a block is exactly one shard
            b = live.load_block(i)
            writer.add(b.activations, b.token_ids, b.mask)
            bar.update(len(b.token_ids))
    return writer.close()
