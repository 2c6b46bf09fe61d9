"""`mlsae cache`: run the model over the corpus and write an activation cache
(text -> tokens -> activations; the format is in cache.py). Optionally through a tuned lens
(SPEC 5): the cache then holds T_l(x[t,l]) and its manifest names the lens.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
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
    _storage_dtype,
    shard_name,
)
from mlsae.core.config import DataConfig, ModelConfig
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
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    n_tokens: int,
    layers: str | None = None,
    storage_dtype: str = "bfloat16",
    batch_size: int = 8,
    shard_tokens: int = 4096,
    lens: str | Path | None = None,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """`mlsae cache`: capture the chosen blocks' outputs for n_tokens tokens (rounded up to
    whole contexts) into `out`; resumes an interrupted run of the same command.
    `transform` maps acts f32[N, L, d] (layers as in the manifest) before storing (lens hook)."""
    from tqdm import tqdm

    from mlsae.data.capture import capture, iter_layers_arg, used_mask
    from mlsae.data.model import load_model

    _storage_dtype(storage_dtype)
    if n_tokens < 1 or batch_size < 1 or shard_tokens < 1:
        raise MlsaeError("--tokens, --batch-size and --shard-tokens must be >= 1")
    if data_cfg.context_length < 1:
        raise MlsaeError(f"--context-length must be >= 1, not {data_cfg.context_length}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file: choose a new --out")
    from mlsae.data.text import iter_documents, take_contexts

    next(iter_documents(data_cfg))  # fail fast on a missing dataset/column/empty split
    tl = None
    if lens is not None:
        from mlsae.lens.tuned import lens_ref, load_lens

        tl = load_lens(lens)  # fail fast on a bad lens folder, before loading the model
    lm = load_model(model_cfg)
    layer_list = iter_layers_arg(layers, lm.n_layers)
    if tl is not None:
        tl.check_model(lm.n_layers, lm.d_model)
        tl.check_layers(layer_list)
        if transform is None:
            transform = lambda acts: tl.forward_stack(acts, layer_list)  # noqa: E731
        lens = lens_ref(lens)  # type: ignore[arg-type]
    ctx = data_cfg.context_length
    n_ctx = math.ceil(n_tokens / ctx)
    per_shard = max(1, shard_tokens // ctx)  # contexts per shard
    contexts = take_contexts(lm.tokenizer, data_cfg, n_ctx)  # [n_ctx, ctx]
    settings = {
        "model": lm.name, "model_dtype": model_cfg.dtype, "dataset": data_cfg.dataset,
        "split": data_cfg.split, "text_column": data_cfg.text_column, "hf_split": data_cfg.hf_split,
        "test_fraction": data_cfg.test_fraction, "context_length": ctx, "layers": layer_list,
        "d_model": lm.d_model, "dtype": storage_dtype, "lens": lens,
        "requested_tokens": n_tokens, "target_tokens": n_ctx * ctx, "shard_tokens": per_shard * ctx,
    }  # fmt: skip
    done = _resume_point(out, settings, contexts, per_shard)
    if isinstance(done, dict):
        log.info(f"{out} is already complete ({done['n_tokens']} tokens)")
        return done
    meta = {k: v for k, v in settings.items() if k not in ("dtype", "shard_tokens")}
    meta["special_ids"] = list(lm.special_ids)
    writer = CacheWriter(out, meta, per_shard * ctx, storage_dtype, shards=done or [])
    start = len(done or []) * per_shard
    if start:
        log.info(f"resuming {out} after {start * ctx} tokens")
    L, d = len(layer_list), lm.d_model
    bar = tqdm(total=n_ctx * ctx, initial=start * ctx, unit="tok", unit_scale=True, desc="cache")
    with bar, torch.inference_mode():
        for s0 in range(start, n_ctx, per_shard):  # batches never cross a shard boundary
            s1 = min(s0 + per_shard, n_ctx)
            for b0 in range(s0, s1, batch_size):
                ids = contexts[b0 : min(b0 + batch_size, s1)]  # [B, T]
                acts = capture(lm.model, ids, layer_list).reshape(-1, L, d)  # [B*T, L, d]
                if transform is not None:
                    acts = transform(acts.float())
                writer.add(acts, ids.reshape(-1), used_mask(ids, lm.special_ids).reshape(-1))
                bar.update(ids.numel())
    return writer.close()
