"""Each batch slot's K and V block ids, kept as rows of two arrays while the scheduler gives blocks out, so
a step's block tables are one gather by batch slot rather than a row copied from a list per request (at
S1's 240 decode rows that copy was the largest part of building a step's batch: benchmarks/host_step.py).
The requests' own block lists stay the record; these rows mirror them for running requests."""
from __future__ import annotations

import numpy as np


class BlockTables:
    def __init__(self, num_slots: int, width: int):
        """num_slots batch slots of width blocks each (max_model_len / kv_block)."""
        self.k = np.zeros((num_slots, width), np.int32)
        self.v = np.zeros((num_slots, width), np.int32)

    def assign(self, slot: int, k_blocks: list[int], v_blocks: list[int]) -> None:
        """A slot's whole rows: an admitted request's blocks, zeros past them."""
        for table, blocks in ((self.k, k_blocks), (self.v, v_blocks)):
            table[slot] = 0
            table[slot, : len(blocks)] = blocks

    def extend(self, slot: int, start: int, k_blocks: list[int], v_blocks: list[int]) -> None:
        """Blocks a running request gained, from its block index start on."""
        self.k[slot, start: start + len(k_blocks)] = k_blocks
        self.v[slot, start: start + len(v_blocks)] = v_blocks

    def rows(self, slots: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) tables [n, width] of these slots' requests, zero rows past them."""
        k, v = np.zeros((n, self.k.shape[1]), np.int32), np.zeros((n, self.v.shape[1]), np.int32)
        k[: len(slots)], v[: len(slots)] = self.k[slots], self.v[slots]
        return k, v
