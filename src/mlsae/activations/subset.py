"""`BlockSubset`: some blocks of a source, as a source of their own (one process's share of a
data-parallel job).

`rank_share(source, rank, world)` gives process `rank` of `world` the blocks rank, rank + world,
rank + 2 world, ... (spread over the whole stream). Each process shuffles its own share, so it
reads (and, for a live source, runs the model on) only its blocks; a job of one process reads
the source itself. Offsets stay the source's, so positions are global.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mlsae.activations.source import ActivationSource, Block
from mlsae.core.errors import MlsaeError


class BlockSubset(ActivationSource):
    """Blocks `blocks` of `base`, in that order."""

    def __init__(self, base: ActivationSource, blocks: Sequence[int]) -> None:
        self.base, self.blocks = base, [int(i) for i in blocks]
        bad = [i for i in self.blocks if not 0 <= i < base.n_blocks]
        if bad:
            raise MlsaeError(f"blocks {bad} are not in {base.describe()} ({base.n_blocks} blocks)")
        self.layers, self.d_model = base.layers, base.d_model
        self.context_length, self.dtype = base.context_length, base.dtype
        self.info, self.prefetch = base.info, base.prefetch

    def describe(self) -> str:
        return f"{len(self.blocks)} of the {self.base.n_blocks} blocks of {self.base.describe()}"

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_tokens(self, i: int) -> int:
        return self.base.block_tokens(self.blocks[i])

    def n_used(self, i: int) -> int:
        return self.base.n_used(self.blocks[i])

    def load_block(self, i: int) -> Block:
        return self.base.load_block(self.blocks[i])

    def block_ids(self, i: int) -> tuple[Tensor, Tensor]:
        return self.base.block_ids(self.blocks[i])


def rank_share(source: ActivationSource, rank: int, world: int) -> ActivationSource:
    """Process `rank`'s blocks of a `world`-process job (the source itself when world is 1)."""
    if world == 1:
        return source
    if source.n_blocks < world:
        raise MlsaeError(
            f"{source.describe()} has {source.n_blocks} blocks, fewer than the "
            f"{world} processes: use more tokens or smaller blocks"
        )
    return BlockSubset(source, range(rank, source.n_blocks, world))
