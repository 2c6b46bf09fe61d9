"""`LiveSource`: activations computed on demand by running the model on a dataset split.

Block i is the group of contexts [i * per_block, (i + 1) * per_block) of the split's context
stream (`mlsae.data.text.iter_contexts`), run through the model in batches of `batch_size`
contexts with the blocks' outputs captured (`mlsae.data.capture.capture`), optionally mapped
(a tuned lens), and rounded to the storage dtype, exactly as `mlsae cache` stores them: a live
source and a cache of the same settings yield the same blocks. Reading in stream order holds one
block at a time; random access (`shuffled`, `n_used`) tokenizes the requested tokens once and
keeps their ids (2 bytes per token for vocabularies up to 65,536, else 4), never their vectors.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from mlsae.activations.source import ActivationSource, Block
from mlsae.core.config import DataConfig
from mlsae.core.errors import MlsaeError
from mlsae.data.model import LoadedModel, check_context_length

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class LiveSource(ActivationSource):
    """The model run on `n_tokens` tokens (rounded up to whole contexts) of a dataset split."""

    prefetch = False  # the model already uses every core; a second thread only contends

    def __init__(
        self,
        lm: LoadedModel,
        data: DataConfig,
        n_tokens: int,
        layers: Sequence[int],
        *,
        batch_size: int = 8,
        block_tokens: int = 4096,
        storage_dtype: str = "bfloat16",
        transform: Callable[[Tensor], Tensor] | None = None,
        lens: str | None = None,
        model_dtype: str = "float32",
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise MlsaeError(f"unknown storage dtype {storage_dtype!r} (bfloat16, float32)")
        if n_tokens < 1 or batch_size < 1 or block_tokens < 1:
            raise MlsaeError("--tokens, --batch-size and --shard-tokens must be >= 1")
        self.lm, self.data = lm, data
        self.layers = [int(x) for x in layers]
        self.d_model = int(lm.d_model)
        self.context_length = int(data.context_length)
        check_context_length(lm.model, self.context_length, lm.name)
        self.dtype = STORAGE_DTYPES[storage_dtype]
        self.batch_size = int(batch_size)
        self.transform = transform
        self.n_contexts = math.ceil(n_tokens / self.context_length)
        self.per_block = max(1, block_tokens // self.context_length)
        self._ids: Tensor | None = None  # [n_contexts, T] compact, tokenized on first random access
        self.info = {
            "model": lm.name,
            "model_dtype": model_dtype,
            "dataset": data.name,
            "split": data.split,
            "text_column": data.text_column,
            "hf_split": data.hf_split,
            "test_fraction": data.test_fraction,
            "context_length": self.context_length,
            "layers": self.layers,
            "d_model": self.d_model,
            "dtype": storage_dtype,
            "lens": lens,
            "special_ids": list(lm.special_ids),
            "exclude_sink": data.exclude_sink,
        }

    def describe(self) -> str:
        return f"{self.lm.name} on {self.data.name!r} ({self.data.split})"

    # ------------------------------------------------------------------ tokens

    def _compact_ids(self) -> Tensor:
        """All contexts' token ids [n_contexts, T], tokenized once and kept compact: uint16 (2
        bytes per token) for vocabularies up to 65,536 ids, else int32; MlsaeError if the split
        holds fewer tokens than requested."""
        if self._ids is None:
            from mlsae.data.text import iter_contexts, take_contexts

            vocab = len(self.lm.tokenizer)
            dtype = torch.uint16 if vocab <= 1 << 16 else torch.int32
            ids = torch.empty(self.n_contexts, self.context_length, dtype=dtype)
            n = 0
            for row in itertools.islice(
                iter_contexts(self.lm.tokenizer, self.data), self.n_contexts
            ):
                if int(row.max()) >= vocab or int(row.min()) < 0:
                    raise MlsaeError(f"token ids outside the vocabulary of {self.lm.name}")
                ids[n] = row
                n += 1
            if n < self.n_contexts:  # the same error as a cache of this size
                take_contexts(self.lm.tokenizer, self.data, self.n_contexts)
            self._ids = ids
        return self._ids

    def contexts(self) -> Tensor:
        """All contexts' token ids [n_contexts, T] int64 (tokenized once, kept compact)."""
        return self._compact_ids().long()

    def iter_contexts(self) -> Iterator[Tensor]:
        """The contexts one by one ([T] int64 each) without holding them all."""
        if self._ids is not None:
            for row in self._ids:
                yield row.long()
            return
        from mlsae.data.text import iter_contexts

        yield from itertools.islice(iter_contexts(self.lm.tokenizer, self.data), self.n_contexts)

    def used(self, ids: Tensor) -> Tensor:
        """[..., T] bool: the positions whose vectors count (not special tokens)."""
        from mlsae.data.capture import used_mask

        return used_mask(ids, self.lm.special_ids, exclude_first=self.data.exclude_sink)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_contexts / self.per_block)

    def block_tokens(self, i: int) -> int:
        first = i * self.per_block
        return (min(first + self.per_block, self.n_contexts) - first) * self.context_length

    def _block_contexts(self, i: int) -> Tensor:
        return self._compact_ids()[i * self.per_block : (i + 1) * self.per_block].long()

    def n_used(self, i: int) -> int:
        return int(self.used(self._block_contexts(i)).sum())

    def block_ids(self, i: int) -> tuple[Tensor, Tensor]:
        ids = self._block_contexts(i)
        return ids.reshape(-1), self.used(ids).reshape(-1)

    # ------------------------------------------------------------------ vectors

    @torch.inference_mode()
    def vectors(self, ids: Tensor) -> Tensor:
        """Stored-form vectors of contexts ids [C, T]: [C * T, L, d] in the storage dtype."""
        from mlsae.data.capture import capture

        parts = []
        for b in range(0, len(ids), self.batch_size):
            x = ids[b : b + self.batch_size]
            acts = capture(self.lm.model, x, self.layers).reshape(
                -1, len(self.layers), self.d_model
            )
            if self.transform is not None:
                acts = self.transform(acts.float())
            parts.append(acts.to(self.dtype))
        return torch.cat(parts)

    def load_block(self, i: int) -> Block:
        ids = self._block_contexts(i)
        flat = ids.reshape(-1)
        return Block(
            self.vectors(ids),
            flat,
            self.used(ids).reshape(-1),
            i * self.per_block * self.context_length,
        )

    def iter_ordered(self, max_tokens: int | None = None) -> Iterator[Block]:
        """Blocks in stream order without tokenizing ahead (memory: one block)."""
        limit = (
            self.n_contexts
            if max_tokens is None
            else min(self.n_contexts, math.ceil(max_tokens / self.context_length))
        )
        it = itertools.islice(self.iter_contexts(), limit)
        done = 0
        while chunk := list(itertools.islice(it, self.per_block)):
            ids = torch.stack(chunk)
            yield Block(
                self.vectors(ids),
                ids.reshape(-1),
                self.used(ids).reshape(-1),
                done * self.context_length,
            )
            done += len(chunk)
        if done < limit:
            log.warning(
                f"{self.describe()} holds only {done * self.context_length} tokens "
                f"({done} contexts), fewer than the {limit * self.context_length} asked for"
            )

    def token_batches(
        self, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        limit = (
            self.n_contexts
            if max_tokens is None
            else min(self.n_contexts, math.ceil(max_tokens / self.context_length))
        )
        it = itertools.islice(self.iter_contexts(), limit)
        while chunk := list(itertools.islice(it, batch_size)):
            ids = torch.stack(chunk)
            yield ids, self.used(ids)
