"""The on-disk activation cache (ARCHITECTURE.md "Activation cache format").

A folder with `manifest.json` and `shard_00000.safetensors`, ... Each shard holds
`activations` [n, L, d] (bf16 default), `token_ids` [n] int64 and `mask` [n] bool, in stream
order; contexts are never split across shards. Every file is written to a temp name and
renamed; the manifest is rewritten after each shard with `complete: false` until the end, so a
killed run never leaves a cache that `ActivationCache` accepts, and re-running the same
`mlsae cache` command resumes from the last verified shard.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor

from mlsae.activations.source import ActivationSource, Batch, Block, Shard

__all__ = ["ActivationCache", "Batch", "Block", "CacheWriter", "Shard"]
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_bytes, write_json

MANIFEST = "manifest.json"
FORMAT = "mlsae-activation-cache"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED_FIELDS = (
    "model", "dataset", "split", "layers", "d_model", "dtype", "n_tokens", "context_length",
    "lens", "shards", "complete",
)  # fmt: skip
_OURS = re.compile(r"^\.?(shard_\d{5}\.safetensors|manifest\.json)(\..*\.tmp|\.tmp)?$")
"""Our file names, and the temporary names `mlsae.core.io` writes them under."""
_VERIFIED: set[tuple[str, str, int, int]] = set()  # (path, sha256, size, mtime_ns) checked


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


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
) -> dict[str, Any]:
    """Write shard `index` of a cache (activations [n, L, d] stored in `dtype`, token_ids [n],
    mask [n]) atomically; returns its manifest entry."""
    tensors = {"activations": acts.detach().to("cpu", dtype), "token_ids": ids.cpu().long(),
               "mask": mask.cpu().bool()}  # fmt: skip
    data = st_save({k: v.contiguous() for k, v in tensors.items()})
    name = shard_name(index)
    write_bytes(Path(out) / name, data, fsync=True)
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "n_tokens": len(ids),
            "n_used": int(tensors["mask"].sum())}  # fmt: skip


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
        shards: list[dict[str, Any]] | None = None,
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
        done = [dict(s) for s in shards or []]
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": 1,
            **{k: None for k in ("model", "dataset", "split", "context_length", "lens")},
            **meta,
            "layers": [int(x) for x in meta["layers"]],
            "d_model": self.d_model,
            "dtype": storage_dtype,
            "n_tokens": sum(int(s["n_tokens"]) for s in done),
            "shard_tokens": self.shard_tokens,
            "shards": done,
            "complete": False,
        }
        self._buf: list[tuple[Tensor, Tensor, Tensor]] = []
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
        self._buf.append((acts, token_ids.detach().cpu().long(), mask.detach().cpu().bool()))
        self._n_buf += n
        while self._n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def flush(self) -> None:
        """Write whatever is buffered as a (possibly short) shard."""
        if self._n_buf:
            self._flush(self._n_buf)

    def _flush(self, n: int) -> None:
        acts, ids, mask = (torch.cat([b[i] for b in self._buf]) for i in range(3))
        self._buf = [(acts[n:], ids[n:], mask[n:])] if self._n_buf > n else []
        self._n_buf -= n
        i = len(self.manifest["shards"])
        self.add_shard(write_shard(self.out, i, acts[:n], ids[:n], mask[:n], self.dtype))

    def add_shard(self, entry: dict[str, Any]) -> None:
        """Record a shard file written by `write_shard` as the next shard (several processes
        writing one cache: each writes its shards, one writer keeps the manifest)."""
        if entry["name"] != shard_name(len(self.manifest["shards"])):
            raise MlsaeError(f"shard {entry['name']} is not the cache's next shard")
        self.manifest["shards"].append(dict(entry))
        self.manifest["n_tokens"] += int(entry["n_tokens"])
        self._save_manifest()

    def close(self) -> dict[str, Any]:
        """Flush, mark the cache complete, return the manifest."""
        self.flush()
        if self.manifest["n_tokens"] == 0:
            raise MlsaeError(f"{self.out}: no tokens were written")
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
        try:
            m = json.loads(man.read_text())
        except (OSError, ValueError) as e:
            raise MlsaeError(f"{man}: unreadable manifest ({e})") from None
        missing = [k for k in REQUIRED_FIELDS if not isinstance(m, dict) or k not in m]
        if missing:
            raise MlsaeError(f"{man}: manifest lacks {missing}: not an mlsae activation cache")
        if m["complete"] is not True:
            raise MlsaeError(
                f"activation cache {self.path} is incomplete (an interrupted `mlsae cache` run): "
                "re-run the same command to resume it"
            )
        try:
            _storage_dtype(m["dtype"])
            self.layers = [int(x) for x in m["layers"]]
            sizes = [int(s["n_tokens"]) for s in m["shards"]]
            names = [str(s["name"]) for s in m["shards"]]
            if not all(isinstance(s["sha256"], str) for s in m["shards"]):
                raise ValueError("sha256 must be a string")
        except (KeyError, TypeError, ValueError, MlsaeError) as e:
            raise MlsaeError(f"{man}: corrupt manifest ({e})") from None
        if sum(sizes) != int(m["n_tokens"]) or not sizes:
            raise MlsaeError(f"{man}: shard sizes add up to {sum(sizes)}, not n_tokens")
        absent = [n for n in names if not (self.path / n).is_file()]
        if absent:
            raise MlsaeError(f"activation cache {self.path}: missing shard file(s) {absent}")
        self.manifest: dict[str, Any] = m
        self.info = m
        self.d_model = int(m["d_model"])
        self.context_length = int(m["context_length"] or 0)  # 0: not recorded
        self.dtype = STORAGE_DTYPES[m["dtype"]]
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

    def _verify(self, i: int) -> Path:
        """Path of shard i after its sha256 check (done once per shard per process)."""
        entry = self.manifest["shards"][i]
        path = self.path / entry["name"]
        st = path.stat()
        key = (str(path.resolve()), entry["sha256"], st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            if _sha256_file(path) != entry["sha256"]:
                raise MlsaeError(
                    f"shard {entry['name']} of {self.path} is corrupt (sha256 mismatch): "
                    "rebuild the cache with `mlsae cache`"
                )
            _VERIFIED.add(key)
        return path

    def _open(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors (memory-mapped), verified and checked against the manifest."""
        path, entry = self._verify(i), self.manifest["shards"][i]
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors' own errors
            raise MlsaeError(f"shard {entry['name']} of {self.path} is unreadable: {e}") from None
        n, L, d = int(entry["n_tokens"]), len(self.layers), self.d_model
        want = {
            "activations": ((n, L, d), self.dtype),
            "token_ids": ((n,), torch.int64),
            "mask": ((n,), torch.bool),
        }
        got = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        if got != want:
            raise MlsaeError(
                f"shard {entry['name']} of {self.path} does not match the manifest: "
                f"expected {want}, found {got}"
            )
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
        if "n_used" not in entry:
            entry["n_used"] = int(self._open(i)["mask"].sum())
        return int(entry["n_used"])
