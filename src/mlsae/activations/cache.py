"""The on-disk activation cache (ARCHITECTURE.md "Activation cache format").

A folder with `manifest.json` and `shard_00000.safetensors`, ... Each shard holds
`activations` [n, L, d] (bf16 default), `token_ids` [n] int64 and `mask` [n] bool, in stream
order; contexts are never split across shards. Every file is written to a temp name and
renamed; the manifest is rewritten after each shard with `complete: false` until the end, so a
killed run never leaves a cache that `ActivationCache` accepts, and re-running the same
`mlsae cache` command resumes from the last verified shard.

A token whose vector (at any stored layer) holds NaN or inf is stored as zeros and masked out;
the manifest counts them (`n_nonfinite`, per shard and in total). The reader checks the manifest
against its schema (`manifest.Manifest`) on open, and each shard once per process: its sha256,
its shapes, its mask against `n_used`, and that every used vector is finite.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor

from mlsae.activations.manifest import FORMAT, Manifest, ShardEntry, fingerprint, shard_name
from mlsae.activations.source import ActivationSource, Batch, Block, Shard
from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json, write_bytes, write_json
from mlsae.core.lock import LOCK

__all__ = ["ActivationCache", "Batch", "Block", "CacheWriter", "Shard"]
log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_OURS = re.compile(
    r"^\.?(shard_\d{5}\.safetensors|manifest\.json)(\..*\.tmp|\.tmp)?$|^" + re.escape(LOCK) + "$"
)
"""Our file names, the temporary names `mlsae.core.io` writes them under, and the lock file."""
_VERIFIED: set[tuple[str, str, int, int]] = set()  # (path, manifest facts, size, mtime_ns) checked


def _storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise MlsaeError(f"unknown storage dtype {name!r} (use {', '.join(STORAGE_DTYPES)})")
    return STORAGE_DTYPES[name]


def _sha256_file(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(1 << 23)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


def write_shard(
    out: Path, index: int, acts: Tensor, ids: Tensor, mask: Tensor, dtype: torch.dtype
) -> ShardEntry:
    """Write shard `index` of a cache (activations [n, L, d] stored in `dtype`, token_ids [n],
    mask [n]) atomically; returns its manifest entry."""
    tensors = {
        "activations": acts.detach().to("cpu", dtype),
        "token_ids": ids.cpu().long(),
        "mask": mask.cpu().bool(),
    }
    data = st_save({k: v.contiguous() for k, v in tensors.items()})
    name = shard_name(index)
    write_bytes(Path(out) / name, data, fsync=True)
    return ShardEntry(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        n_tokens=len(ids),
        n_used=int(tensors["mask"].sum()),
    )


class CacheWriter:
    """Writes a cache from [n, L, d] activation blocks; shards of exactly `shard_tokens` tokens
    (the last may be shorter). `meta` needs `layers` and `d_model` (plus model, dataset, split,
    context_length, lens for provenance); `shards` = verified shards to keep when resuming."""

    def __init__(
        self,
        out: str | Path,
        meta: dict[str, Any],
        shard_tokens: int = 4096,
        storage_dtype: str = "bfloat16",
        *,
        shards: list[ShardEntry] | None = None,
    ) -> None:
        self.out = Path(out)
        self.dtype = _storage_dtype(storage_dtype)
        if shard_tokens < 1:
            raise MlsaeError(f"shard_tokens must be >= 1, not {shard_tokens}")
        if "layers" not in meta or "d_model" not in meta:
            raise MlsaeError("CacheWriter meta needs 'layers' and 'd_model'")
        if shards is None and self.out.exists() and any(self.out.iterdir()):
            raise MlsaeError(f"{self.out} exists and is not empty: choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = int(shard_tokens)
        self.n_layers, self.d_model = len(meta["layers"]), int(meta["d_model"])
        done = list(shards or [])
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": 1,
            **{k: None for k in ("model", "dataset", "split", "context_length", "lens")},
            **meta,
            "layers": [int(x) for x in meta["layers"]],
            "d_model": self.d_model,
            "dtype": storage_dtype,
            "n_tokens": sum(s.n_tokens for s in done),
            "shard_tokens": self.shard_tokens,
            "shards": [s.to_json() for s in done],
            "n_nonfinite": sum(s.n_nonfinite for s in done),
            "complete": False,
        }
        self._buf: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # acts, ids, mask, non-finite
        self._n_buf = 0
        self._save_manifest()

    def _save_manifest(self) -> None:
        write_json(self.out / MANIFEST, self.manifest)

    def add(self, activations: Tensor, token_ids: Tensor, mask: Tensor) -> None:
        """Append tokens: activations [n, L, d], token_ids [n], mask [n]."""
        n = int(token_ids.shape[0])
        if activations.shape != (n, self.n_layers, self.d_model) or mask.shape != (n,):
            raise MlsaeError(
                f"CacheWriter.add: expected activations [{n}, {self.n_layers}, {self.d_model}] and "
                f"mask [{n}], got {list(activations.shape)} and {list(mask.shape)}"
            )
        acts = activations.detach().to("cpu", self.dtype)
        mask = mask.detach().cpu().bool()
        bad = ~torch.isfinite(acts).flatten(1).all(1)  # [n] tokens with a NaN / inf vector
        if bad.any():
            acts = acts.clone()
            acts[bad] = 0
            mask = mask & ~bad
        self._buf.append((acts, token_ids.detach().cpu().long(), mask, bad))
        self._n_buf += n
        while self._n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def flush(self) -> None:
        """Write whatever is buffered as a (possibly short) shard."""
        if self._n_buf:
            self._flush(self._n_buf)

    def _flush(self, n: int) -> None:
        acts, ids, mask, bad = (torch.cat([b[i] for b in self._buf]) for i in range(4))
        self._buf = [(acts[n:], ids[n:], mask[n:], bad[n:])] if self._n_buf > n else []
        self._n_buf -= n
        entry = write_shard(
            self.out, len(self.manifest["shards"]), acts[:n], ids[:n], mask[:n], self.dtype
        )
        n_bad = int(bad[:n].sum())
        if n_bad:
            entry.n_nonfinite = n_bad
            log.warning(
                f"{self.out / entry.name}: {n_bad} token(s) whose vectors held NaN or "
                "inf are stored as zeros and masked out"
            )
        self.add_shard(entry)

    def add_shard(self, entry: ShardEntry) -> None:
        """Record a shard file written by `write_shard` as the next shard (several processes
        writing one cache: each writes its shards, one writer keeps the manifest)."""
        if entry.name != shard_name(len(self.manifest["shards"])):
            raise MlsaeError(f"shard {entry.name} is not the cache's next shard")
        self.manifest["shards"].append(entry.to_json())
        self.manifest["n_tokens"] += entry.n_tokens
        self.manifest["n_nonfinite"] += entry.n_nonfinite
        self._save_manifest()

    def close(self) -> dict[str, Any]:
        """Flush, mark the cache complete, return the manifest."""
        self.flush()
        if self.manifest["n_tokens"] == 0:
            raise MlsaeError(f"{self.out}: no tokens were written")
        if self.manifest["n_nonfinite"] == self.manifest["n_tokens"]:
            raise MlsaeError(
                f"{self.out}: every vector held NaN or inf (the model's weights or "
                "dtype are broken: try --dtype float32); the cache is left "
                "incomplete"
            )
        self.manifest["complete"] = True
        self._save_manifest()
        return dict(self.manifest)


# ----------------------------------------------------------------------------- reading


class ActivationCache(ActivationSource):
    """A finished cache folder (an `ActivationSource` whose blocks are its shards); validates
    the manifest on open (MlsaeError on any problem)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        man = self.path / MANIFEST
        if not man.is_file():
            what = "does not exist" if not self.path.exists() else "has no manifest.json"
            raise MlsaeError(f"activation cache {self.path} {what}")
        m = read_json(man, "manifest")
        if not isinstance(m, dict) or ("format" in m and m["format"] != FORMAT):
            raise MlsaeError(f"{man}: not an mlsae activation cache manifest")
        if m.get("complete") is False:
            raise MlsaeError(
                f"activation cache {self.path} is incomplete (an interrupted `mlsae cache` run): "
                "re-run the same command to resume it"
            )
        from mlsae.core.schema import from_dict

        typed = from_dict(Manifest, m, str(man))
        if not typed.shards:
            raise MlsaeError(f"{man}: the cache lists no shards")
        names = [s.name for s in typed.shards]
        sizes = [s.n_tokens for s in typed.shards]
        absent = [n for n in names if not (self.path / n).is_file()]
        if absent:
            raise MlsaeError(f"activation cache {self.path}: missing shard file(s) {absent}")
        self.manifest: dict[str, Any] = m
        self.info = m
        self.layers = list(typed.layers)
        self.d_model = typed.d_model
        self.context_length = typed.context_length or 0  # 0: not recorded
        self.dtype = STORAGE_DTYPES[typed.dtype]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._sizes = sizes

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def n_blocks(self) -> int:
        return self.n_shards

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def block_tokens(self, i: int) -> int:
        return self._sizes[i]

    def describe(self) -> str:
        return f"cache {self.path}"

    @property
    def fingerprint(self) -> str:
        """Digest of the cache's contents (its shards' sha256): a run records it and refuses to
        resume on other data."""
        return fingerprint(self.manifest)

    def _open(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors (memory-mapped), checked once per process: sha256, shapes, mask
        against the manifest's n_used, finite used vectors."""
        entry = self.manifest["shards"][i]
        path = self.path / entry["name"]
        st = path.stat()
        facts = repr((sorted(entry.items()), self.layers, self.d_model, self.dtype))
        key = (str(path.resolve()), facts, st.st_size, st.st_mtime_ns)
        verified = key in _VERIFIED
        where = f"shard {entry['name']} of {self.path}"
        if not verified and _sha256_file(path) != entry["sha256"]:
            raise MlsaeError(
                f"{where} is corrupt (sha256 mismatch): rebuild the cache by running "
                "the same `mlsae cache` command again"
            )
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors' own errors
            raise MlsaeError(f"{where} is unreadable: {e}") from None
        n, L, d = int(entry["n_tokens"]), len(self.layers), self.d_model
        want = {
            "activations": ((n, L, d), self.dtype),
            "token_ids": ((n,), torch.int64),
            "mask": ((n,), torch.bool),
        }
        got = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        if got != want:
            raise MlsaeError(f"{where} does not match the manifest: expected {want}, found {got}")
        if not verified:
            mask = tensors["mask"]
            used = int(mask.sum())
            if entry.get("n_used") is not None and used != entry["n_used"]:
                raise MlsaeError(
                    f"{where}: the manifest says {entry['n_used']} used tokens, "
                    f"the shard's mask {used}: the manifest was edited; rebuild "
                    "the cache"
                )
            ok = torch.isfinite(tensors["activations"]).flatten(1).all(1) | ~mask  # [n]
            if not bool(ok.all()):
                raise MlsaeError(
                    f"{where} holds {int((~ok).sum())} used token(s) with NaN or "
                    "inf vectors: rebuild the cache with this mlsae (it masks "
                    "them out)"
                )
            _VERIFIED.add(key)
        return tensors

    def load_block(self, i: int) -> Block:
        """Shard i, sha256-checked (once per process) and checked against the manifest."""
        t = self._open(i)
        return Block(t["activations"], t["token_ids"], t["mask"], self.offsets[i])

    load_shard = load_block

    def block_ids(self, i: int) -> tuple[Tensor, Tensor]:
        t = self._open(i)
        return t["token_ids"], t["mask"]

    def n_used(self, i: int) -> int:
        """Number of mask==True tokens in shard i (from the manifest when recorded)."""
        entry = self.manifest["shards"][i]
        if entry.get("n_used") is None:
            entry["n_used"] = int(self._open(i)["mask"].sum())
        return int(entry["n_used"])
