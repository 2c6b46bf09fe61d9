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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import Tensor

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


@dataclass
class Shard:
    """One shard: tokens [offset, offset + n) of the split's context stream."""

    activations: Tensor  # [n, L, d] storage dtype
    token_ids: Tensor  # [n] int64
    mask: Tensor  # [n] bool, False at special tokens
    offset: int = 0  # global index of the shard's first token


@dataclass
class Batch:
    """Shuffled training vectors."""

    x: Tensor  # [B, d] float32
    layer: Tensor  # [B] int64 block index
    position: Tensor  # [B] int64 global token index

    def __len__(self) -> int:
        return int(self.x.shape[0])


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


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8, person=b"mlsae-shuf")
    return int.from_bytes(h.digest(), "big") >> 1


def _gen(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


# ----------------------------------------------------------------------------- writing


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
        tensors = {"activations": acts[:n], "token_ids": ids[:n], "mask": mask[:n]}
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        name = shard_name(len(self.manifest["shards"]))
        write_bytes(self.out / name, data, fsync=True)
        entry = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "n_tokens": n}
        self.manifest["shards"].append({**entry, "n_used": int(mask[:n].sum())})
        self.manifest["n_tokens"] += n
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


class ActivationCache:
    """A finished cache folder; validates the manifest on open (MlsaeError on any problem)."""

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
        self.d_model = int(m["d_model"])
        self.n_tokens = int(m["n_tokens"])
        self.context_length = m["context_length"]
        self.dtype = STORAGE_DTYPES[m["dtype"]]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

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

    def load_shard(self, i: int) -> Shard:
        """Shard i, sha256-checked (once per process) and checked against the manifest."""
        t = self._open(i)
        return Shard(t["activations"], t["token_ids"], t["mask"], self.offsets[i])

    def iter_ordered(self) -> Iterator[Shard]:
        """Every shard in stream order (the next one is read in a background thread)."""
        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(self.load_shard, 0)
            for i in range(self.n_shards):
                cur = nxt.result()
                if i + 1 < self.n_shards:
                    nxt = pool.submit(self.load_shard, i + 1)
                yield cur

    def n_used(self, i: int) -> int:
        """Number of mask==True tokens in shard i (from the manifest when recorded)."""
        entry = self.manifest["shards"][i]
        if "n_used" not in entry:
            entry["n_used"] = int(self._open(i)["mask"].sum())
        return int(entry["n_used"])

    def _layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(len(self.layers)))
        bad = [x for x in layers if int(x) not in self.layers]
        if bad or not len(layers):
            raise MlsaeError(f"layer(s) {bad or '[]'} not in the cache (it holds {self.layers})")
        return [self.layers.index(x) for x in sorted(set(int(x) for x in layers))]

    def n_vectors(self, layers: Sequence[int] | None = None) -> int:
        """Used tokens x number of layers."""
        return sum(self.n_used(i) for i in range(self.n_shards)) * len(
            self._layer_positions(layers)
        )

    def _fill(self, shards: list[int], lpos: list[int], buf: Tensor) -> tuple[Tensor, Tensor]:
        """Copy several shards' chosen layers into buf [cap, n_l, d]; returns the buffer rows of
        the used tokens [N] and their global positions [N]."""
        lsel = None if lpos == list(range(len(self.layers))) else torch.tensor(lpos)
        rows, pos, a = [], [], 0
        for i in shards:
            t = self._open(i)
            n = len(t["mask"])
            if lsel is None:
                buf[a : a + n].copy_(t["activations"])
            else:
                torch.index_select(t["activations"], 1, lsel, out=buf[a : a + n])
            keep = t["mask"].nonzero().squeeze(1)  # [n_used]
            rows.append(keep + a)
            pos.append(keep + self.offsets[i])
            a += n
        return torch.cat(rows), torch.cat(pos)

    def shuffled(
        self,
        batch_size: int,
        layers: Sequence[int] | None = None,
        seed: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
        buffer_shards: int = 8,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches mixing layers and tokens across buffers of `buffer_shards` shards.

        The epoch is one virtual stream of vectors: shards in a (seed, epoch) order, grouped into
        buffers, each buffer's (token, layer) vectors in a (seed, epoch, buffer) permutation;
        batches are consecutive slices of it, so `skip_batches` jumps straight to the buffer
        holding batch `skip_batches` without reading the ones before. Only mask==True tokens.
        The next buffer is read in a background thread (memory: 2 x buffer_shards shards).
        """
        if batch_size < 1 or buffer_shards < 1 or skip_batches < 0:
            raise MlsaeError("batch_size and buffer_shards must be >= 1, skip_batches >= 0")
        lpos = self._layer_positions(layers)
        n_l = len(lpos)
        layer_ids = torch.tensor([self.layers[p] for p in lpos], dtype=torch.int64)
        order = torch.randperm(self.n_shards, generator=_gen(seed, epoch)).tolist()
        groups = [order[i : i + buffer_shards] for i in range(0, len(order), buffer_shards)]
        sizes = [sum(self.n_used(i) for i in g) * n_l for g in groups]  # vectors per buffer
        start = skip_batches * batch_size
        first, begin = 0, 0  # first buffer needed and its first vector's stream index
        while first < len(groups) and begin + sizes[first] <= start:
            begin += sizes[first]
            first += 1
        todo = [j for j in range(first, len(groups)) if sizes[j]]
        if not todo:
            return
        cap = max(sum(int(self.manifest["shards"][i]["n_tokens"]) for i in groups[j]) for j in todo)
        bufs = [torch.empty(cap, n_l, self.d_model, dtype=self.dtype) for _ in todo[:2]]
        pending: list[tuple[Tensor, Tensor, Tensor]] = []  # pieces of a batch across buffers
        n_pending = 0
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(self._fill, groups[todo[0]], lpos, bufs[0])
            for t, j in enumerate(todo):
                rows, pos = fut.result()
                if t + 1 < len(todo):  # the other buffer is free: its batches were all yielded
                    fut = pool.submit(self._fill, groups[todo[t + 1]], lpos, bufs[(t + 1) % 2])
                take = _Gather(bufs[t % 2].view(-1, self.d_model), layer_ids, rows, pos)
                perm = torch.randperm(sizes[j], generator=_gen(seed, epoch, j))
                o = start - begin if j == first else 0
                if n_pending:
                    piece = take(perm[o : o + batch_size - n_pending])
                    pending.append(piece)
                    n_pending += len(piece[0])
                    o += len(piece[0])
                    if n_pending == batch_size:
                        yield Batch(*(torch.cat(p) for p in zip(*pending, strict=True)))
                        pending, n_pending = [], 0
                while o + batch_size <= sizes[j]:
                    yield Batch(*take(perm[o : o + batch_size]))
                    o += batch_size
                if o < sizes[j]:
                    pending.append(take(perm[o:]))
                    n_pending += sizes[j] - o
        if n_pending and not drop_last:
            yield Batch(*(torch.cat(p) for p in zip(*pending, strict=True)))


@dataclass
class _Gather:
    """Vectors of a buffer by index v over its used vectors (token v // n_l, layer v % n_l)."""

    flat: Tensor  # [cap * n_l, d] storage dtype
    layer_ids: Tensor  # [n_l] block indices
    rows: Tensor  # [N] buffer row of each used token
    pos: Tensor  # [N] global token position of each used token

    def __call__(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_l = len(self.layer_ids)
        tok, lay = idx // n_l, idx % n_l
        x = self.flat.index_select(0, self.rows[tok] * n_l + lay).float()  # [b, d]
        return x, self.layer_ids[lay], self.pos[tok]
