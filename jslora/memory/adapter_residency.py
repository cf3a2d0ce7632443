"""Which adapters are in the GPU pool: their blocks, a residency slot, reference counts, LRU eviction.

A resident adapter owns a residency slot s; row s of the per-target tables (`rank`, `a_pages`,
`b_pages`) holds its rank and the pool pages of its A^T and B rows, so a step's per-row LoRA page table
is one numpy gather by slot. Slot 0 is "no adapter" (rank 0, null pages): base-model rows use it.
Adapters that no running request references stay resident (a cache) until their blocks are needed;
then the least recently used go first, in one LRU with the prefix cache's unreferenced KV blocks
(`caches`: whatever else in the pool can be evicted).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from jslora.memory.allocator import BlockAllocator
from jslora.memory.prefix_cache import lru_clock
from jslora.parallel.lora_partition import LoraPartition

BASE_SLOT = 0


@dataclasses.dataclass
class ResidentAdapter:
    uid: int
    slot: int
    blocks: list[int]
    refs: int = 0
    retired: bool = False  # unregistered or replaced: free as soon as nothing references it


class AdapterResidency:
    def __init__(self, allocator: BlockAllocator, max_adapters: int, partition: LoraPartition | None = None,
                 targets=()):
        """Page tables per target, shaped by the partition: under tensor parallelism a column-parallel
        target's A table holds one device's max_rank / tp rank rows and its B rows sit where the gathered
        shrink output puts them. Without a partition (the scheduler's simulator) there are no tables."""
        self.allocator, self.partition = allocator, partition
        max_rank = partition.max_rank if partition is not None else 0
        chunks = {t: partition.chunks(t) for t in targets} if partition is not None else {}
        a_width = {t: partition.a_table_width(t) for t in chunks}
        self.rank = {t: np.zeros(max_adapters + 1, np.int32) for t in chunks}
        self.a_pages = {t: np.zeros((max_adapters + 1, ci, a_width[t]), np.int32) for t, (ci, _) in chunks.items()}
        self.b_pages = {t: np.zeros((max_adapters + 1, co, max_rank), np.int32) for t, (_, co) in chunks.items()}
        self._free_slots = list(range(max_adapters, BASE_SLOT, -1))
        self.resident: dict[int, ResidentAdapter] = {}
        # unreferenced, oldest first: uid -> when it was last used (prefix_cache.lru_clock)
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lru_blocks = 0  # blocks of the adapters in _lru (kept as they move: asked for every KV growth)
        self.caches: list = []  # other evictable pool contents: the prefix cache (reclaimable_blocks,
        # oldest_use(), evict_oldest()), evicted in one LRU order with the idle adapters
        self.loads = 0
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------------
    def get(self, uid: int) -> ResidentAdapter | None:
        return self.resident.get(uid)

    def blocks_for_pages(self, num_pages: int) -> int:
        return self.allocator.blocks_for(num_pages)

    @property
    def reclaimable_blocks(self) -> int:
        return self._lru_blocks

    @property
    def blocks_in_use(self) -> int:
        return sum(len(r.blocks) for r in self.resident.values())

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def has_free_slot(self) -> bool:
        return bool(self._free_slots) or bool(self._lru)

    # -- changes ---------------------------------------------------------------------------------
    def make_room(self, num_blocks: int, need_slot: bool = False) -> bool:
        """Evict unreferenced adapters and cached KV blocks, least recently used first, until `num_blocks`
        are free (and a slot, if asked: adapters only give those). Evicts nothing when that cannot succeed."""
        if self.allocator.num_free >= num_blocks and (self._free_slots or not need_slot):
            return True  # the common case, asked for every request's KV growth every step
        reclaimable = self.reclaimable_blocks + sum(c.reclaimable_blocks for c in self.caches)
        if self.allocator.num_free + reclaimable < num_blocks or (need_slot and not self.has_free_slot()):
            return False
        while need_slot and not self._free_slots:
            self._evict(next(iter(self._lru)))
        while self.allocator.num_free < num_blocks:
            oldest = min(((cache.oldest_use(), cache) for cache in self.caches if cache.reclaimable_blocks),
                         key=lambda t: t[0], default=(None, None))
            if self._lru and (oldest[1] is None or self._lru[next(iter(self._lru))] < oldest[0]):
                self._evict(next(iter(self._lru)))
            else:
                oldest[1].evict_oldest()
        return True

    def install(self, uid: int, index: dict[str, tuple[np.ndarray, np.ndarray]], num_pages: int):
        """Give adapter `uid` blocks and a slot (call make_room first). index: target -> (a, b) tables of
        *local* page numbers 0..num_pages-1 ([chunks, r] each). Returns (ResidentAdapter, its page ids)."""
        blocks = self.allocator.allocate(self.blocks_for_pages(num_pages))
        pages = self.allocator.pages(blocks)[:num_pages]
        slot = self._free_slots.pop()
        for target in self.rank:
            a, b = index.get(target, (np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32)))
            r = b.shape[1] if b.size else 0  # B's rows: the rank (padded to a multiple of tp under TP)
            self.rank[target][slot] = r
            self.a_pages[target][slot] = 0
            self.b_pages[target][slot] = 0
            if r:
                self.a_pages[target][slot, :, : a.shape[1]] = pages[a]
                self.b_pages[target][slot][:, self.partition.expand_positions(target, r)] = pages[b]
        entry = ResidentAdapter(uid, slot, blocks)
        self.resident[uid] = entry
        self._make_idle(entry)
        self.loads += 1
        return entry, pages

    def acquire(self, uid: int) -> ResidentAdapter:
        entry = self.resident[uid]
        entry.refs += 1
        self._make_busy(entry)
        return entry

    def release(self, uid: int) -> None:
        entry = self.resident[uid]
        entry.refs -= 1
        assert entry.refs >= 0
        if entry.refs == 0:
            if entry.retired:
                self._evict(uid)
            else:
                self._make_idle(entry)  # most recently used

    def retire(self, uid: int) -> None:
        """The adapter was unregistered or replaced: drop it now, or when its last request finishes."""
        entry = self.resident.get(uid)
        if entry is None:
            return
        entry.retired = True
        if entry.refs == 0:
            self._evict(uid)

    def _evict(self, uid: int) -> None:
        entry = self.resident.pop(uid)
        self._make_busy(entry)  # out of the LRU
        self.allocator.free(entry.blocks)
        for target in self.rank:
            self.rank[target][entry.slot] = 0
        self._free_slots.append(entry.slot)
        self.evictions += 1

    def _make_idle(self, entry: ResidentAdapter) -> None:
        """Into the LRU as its most recently used entry (unreferenced: evictable)."""
        self._make_busy(entry)
        self._lru[entry.uid] = next(lru_clock)
        self._lru_blocks += len(entry.blocks)

    def _make_busy(self, entry: ResidentAdapter) -> None:
        if self._lru.pop(entry.uid, None) is not None:
            self._lru_blocks -= len(entry.blocks)
