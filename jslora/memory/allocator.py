"""A free list of page blocks over the unified pool.

The pool's pages are handed out in blocks of `block_size` consecutive page ids (block b holds pages
b*block_size ...). KV caches and adapters take whole blocks from the same free list, so neither can
fragment the other. Block 0 holds the null page and is never handed out.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.pool import cdiv

NULL_BLOCK = 0


class OutOfPages(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, blocks: range | None = None):
        """Hands out blocks 1 .. num_blocks-1, or only those in `blocks` (the no-unified baseline
        splits the pool into a KV part and an adapter part)."""
        if num_blocks < 2:
            raise ValueError(f"the pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        blocks = blocks if blocks is not None else range(1, num_blocks)
        assert NULL_BLOCK not in blocks and blocks.stop <= num_blocks
        self._free = list(reversed(blocks))  # a stack: low ids come out first
        self._capacity = len(blocks)
        self._owned = np.zeros(num_blocks, bool)
        self._owned[list(blocks)] = True
        self._in_use = np.zeros(num_blocks, bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self._capacity

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens pages (one K or V row per token)."""
        return cdiv(num_tokens, self.block_size)

    def free_blocks(self) -> list[int]:
        return list(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{n} blocks asked for, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._in_use[blocks] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        if not blocks:
            return
        if not (self._in_use[blocks] & self._owned[blocks]).all() or len(set(blocks)) != len(blocks):
            raise AssertionError(f"freeing blocks that are not allocated: {blocks}")
        self._in_use[blocks] = False
        self._free.extend(reversed(blocks))

    def pages(self, blocks: list[int]) -> np.ndarray:
        """The page ids of `blocks`, in order."""
        b = np.asarray(blocks, np.int32)
        return (b[:, None] * self.block_size + np.arange(self.block_size, dtype=np.int32)).reshape(-1)


def kv_blocks(k_blocks: list[int], v_blocks: list[int], kv_pages: int) -> list[int]:
    """The distinct blocks a request's (or a cached entry's) keys and values hold: both lists, or, where a
    token's key and value share a page (kv_pages 1: an FP8 cache), the key blocks alone."""
    return list(k_blocks) + (list(v_blocks) if kv_pages == 2 else [])
