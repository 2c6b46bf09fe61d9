"""The one activation interface every later stage reads: `ActivationSource`.

A source is a sequence of blocks of consecutive tokens of one split's context stream, each with
the residual vectors of some blocks of the model: an activation cache on disk (a block is a
shard, `ActivationCache`) or the model run live on a dataset (a block is a group of contexts,
`LiveSource`). On top of `load_block` this module gives every source the same readers:
`iter_ordered` (stream order: evaluation, analysis, evolution), `shuffled` (training batches
mixing tokens and layers, deterministic in (seed, epoch) so `skip_batches` resumes exactly),
`token_batches` (token ids for delta CE) and `n_vectors`. `open_source` is the one place that
decides between a cache and the model.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlsae.core.errors import MlsaeError


@dataclass
class Block:
    """Tokens [offset, offset + n) of the split's context stream (whole contexts)."""

    activations: Tensor  # [n, L, d] storage dtype, layers as `source.layers`
    token_ids: Tensor  # [n] int64
    mask: Tensor  # [n] bool, False at excluded positions (special tokens, ...)
    offset: int = 0  # stream index of the block's first token


Shard = Block
"""A cache shard is a block (the name the cache format uses)."""


@dataclass
class Batch:
    """Shuffled training vectors."""

    x: Tensor  # [B, d] float32
    layer: Tensor  # [B] int64 block index
    position: Tensor  # [B] int64 global token index

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8, person=b"mlsae-shuf")
    return int.from_bytes(h.digest(), "big") >> 1


def _gen(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


class ActivationSource(ABC):
    """Blocks of consecutive tokens with their residual vectors (see the module docstring).

    Subclasses set `layers` (block indices of the L stored layers), `d_model`, `context_length`,
    `dtype` (of `Block.activations`) and `info` (provenance: model, dataset, split, lens, ...),
    and implement `n_blocks`, `block_tokens`, `n_used` and `load_block`."""

    layers: list[int]
    d_model: int
    context_length: int
    dtype: torch.dtype
    info: dict[str, Any]
    prefetch: bool = True
    """Read the next block in a background thread while the current one is consumed."""

    @property
    @abstractmethod
    def n_blocks(self) -> int: ...

    @abstractmethod
    def block_tokens(self, i: int) -> int:
        """Tokens of block i (used or not)."""

    @abstractmethod
    def n_used(self, i: int) -> int:
        """Used (mask == True) tokens of block i."""

    @abstractmethod
    def load_block(self, i: int) -> Block:
        """Block i with its vectors."""

    @property
    def n_tokens(self) -> int:
        return sum(self.block_tokens(i) for i in range(self.n_blocks))

    @property
    def lens(self) -> str | None:
        """The tuned lens the stored vectors went through (None: the model's space)."""
        return self.info.get("lens")

    def describe(self) -> str:
        return f"{type(self).__name__}({self.info.get('model')!r}, {self.info.get('dataset')!r})"

    # ------------------------------------------------------------------ stream order

    def _blocks(self, max_tokens: int | None) -> list[int]:
        out, n = [], 0
        for i in range(self.n_blocks):
            if max_tokens is not None and n >= max_tokens:
                break
            out.append(i)
            n += self.block_tokens(i)
        return out

    def iter_ordered(self, max_tokens: int | None = None) -> Iterator[Block]:
        """Blocks in stream order; with max_tokens, the tokens of the first
        ceil(max_tokens / context_length) contexts (the last block cut to that)."""
        todo = self._blocks(max_tokens)
        if not todo:
            return
        ctx = max(1, self.context_length)
        left = None if max_tokens is None else -(-max_tokens // ctx) * ctx
        for b in self._load_all(todo):
            if left is not None:
                if len(b.token_ids) > left:
                    b = Block(b.activations[:left], b.token_ids[:left], b.mask[:left], b.offset)
                left -= len(b.token_ids)
            yield b

    def _load_all(self, todo: list[int]) -> Iterator[Block]:
        if not self.prefetch:
            for i in todo:
                yield self.load_block(i)
            return
        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(self.load_block, todo[0])
            for t in range(len(todo)):
                cur = nxt.result()
                if t + 1 < len(todo):
                    nxt = pool.submit(self.load_block, todo[t + 1])
                yield cur

    def token_batches(
        self, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(ids [B, T], used [B, T]) batches of whole contexts in stream order, up to the whole
        context holding token max_tokens."""
        ctx, left = self.context_length, max_tokens
        if ctx < 1:
            raise MlsaeError(f"{self.describe()} does not record its context length")
        buf_i: list[Tensor] = []
        buf_u: list[Tensor] = []
        for i in self._blocks(max_tokens):
            ids, used = self.block_ids(i)
            if left is not None:
                keep = -(-left // ctx) * ctx
                ids, used = ids[:keep], used[:keep]
                left -= len(ids)
            buf_i.append(ids.view(-1, ctx))
            buf_u.append(used.view(-1, ctx))
            while sum(len(b) for b in buf_i) >= batch_size:
                a, u = torch.cat(buf_i), torch.cat(buf_u)
                yield a[:batch_size], u[:batch_size]
                buf_i, buf_u = [a[batch_size:]], [u[batch_size:]]
        if buf_i and sum(len(b) for b in buf_i):
            yield torch.cat(buf_i), torch.cat(buf_u)

    def block_ids(self, i: int) -> tuple[Tensor, Tensor]:
        """(token ids [n], mask [n]) of block i; sources that can do it without the vectors
        override this."""
        b = self.load_block(i)
        return b.token_ids, b.mask

    # ------------------------------------------------------------------ training order

    def layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        """Positions in `self.layers` of the requested block indices (all when None)."""
        if layers is None:
            return list(range(len(self.layers)))
        bad = [x for x in layers if int(x) not in self.layers]
        if bad or not len(layers):
            raise MlsaeError(
                f"layer(s) {bad or '[]'} not in the activations (they hold {self.layers})"
            )
        return [self.layers.index(x) for x in sorted({int(x) for x in layers})]

    def n_vectors(self, layers: Sequence[int] | None = None) -> int:
        """Used tokens x number of layers."""
        return sum(self.n_used(i) for i in range(self.n_blocks)) * len(self.layer_positions(layers))

    def _fill(self, blocks: list[int], lpos: list[int], buf: Tensor) -> tuple[Tensor, Tensor]:
        """Copy several blocks' chosen layers into buf [cap, n_l, d]; returns the buffer rows of
        the used tokens [N] and their stream positions [N]."""
        lsel = None if lpos == list(range(len(self.layers))) else torch.tensor(lpos)
        rows, pos, a = [], [], 0
        for i in blocks:
            b = self.load_block(i)
            n = len(b.mask)
            if lsel is None:
                buf[a : a + n].copy_(b.activations)
            else:
                torch.index_select(b.activations.to(buf.dtype), 1, lsel, out=buf[a : a + n])
            keep = b.mask.nonzero().squeeze(1)  # [n_used]
            rows.append(keep + a)
            pos.append(keep + b.offset)
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
        group_tokens: bool = False,
    ) -> Iterator[Batch]:
        """Batches mixing layers and tokens across buffers of `buffer_shards` blocks.

        The epoch is one virtual stream of vectors: blocks in a (seed, epoch) order, grouped into
        buffers, each buffer's (token, layer) vectors in a (seed, epoch, buffer) permutation;
        batches are consecutive slices of it, so `skip_batches` jumps straight to the buffer
        holding batch `skip_batches` without reading the ones before. Only mask==True tokens.
        The next buffer is read in a background thread (memory: 2 x buffer_shards blocks).
        group_tokens: the permutation moves whole tokens (each token's layers stay consecutive,
        in `layers` order), so batches of a multiple of len(layers) vectors hold whole tokens.
        """
        if batch_size < 1 or buffer_shards < 1 or skip_batches < 0:
            raise MlsaeError("batch_size and buffer_shards must be >= 1, skip_batches >= 0")
        lpos = self.layer_positions(layers)
        n_l = len(lpos)
        layer_ids = torch.tensor([self.layers[p] for p in lpos], dtype=torch.int64)
        order = torch.randperm(self.n_blocks, generator=_gen(seed, epoch)).tolist()
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
        cap = max(sum(self.block_tokens(i) for i in groups[j]) for j in todo)
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
                perm = torch.randperm(
                    sizes[j] // (n_l if group_tokens else 1), generator=_gen(seed, epoch, j)
                )
                if group_tokens:  # token t -> its vectors t * n_l + [0, n_l)
                    perm = (perm.unsqueeze(1) * n_l + torch.arange(n_l)).reshape(-1)
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
