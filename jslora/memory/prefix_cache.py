"""Prompt KV kept after its request finishes, found again by a chain key per block (prefix caching).

A full block of a sequence (kv_block tokens) is keyed by (the key's entry of the block before it,
adapter identity, its token ids): the chain makes a key name the whole prefix up to its block, and the
adapter identity is its registration uid, new for every (re)registration, so one adapter's KV is never
served to another, nor an old version's to a replacement under the same name (vLLM issues 30931, 42125).
The base model is uid 0. A request's `cache_salt` (vLLM's) joins the identity: tenants who salt share
blocks only among themselves, so no other tenant can time a hit on their prompts. Keys are compared
whole (dict keys, not digests), so no hostile prompt can collide with another tenant's.

A cached block is the pair (K block, V block) of the pool. While requests hold it, its `refs` count
them; with none it is evictable: it waits in an LRU with the idle adapters (`AdapterResidency` evicts
the least recently used of both when the pool needs room), so cached prefixes go before any running
request is preempted. A request's own blocks are registered as it is scheduled (the step that computes
them writes their K/V before any attention reads them, so a request admitted in the same step may
already use them); if that step fails for the registering request, its fresh entries are killed
(`kill_fresh`) and whoever took them recomputes.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

from jslora.memory.allocator import BlockAllocator, kv_blocks

# one clock for every LRU of the pool (idle adapters and cached blocks): larger is more recent
lru_clock = itertools.count(1)

ROOT = 0  # the parent id of a sequence's first block
BASE_MODEL = 0  # the adapter identity of base-model requests (adapter uids start at 1)


@dataclasses.dataclass(eq=False)
class CachedBlock:
    id: int
    key: tuple          # (parent id, adapter identity, token ids)
    k_block: int
    v_block: int
    owner: object       # the request that computes it (for kill_fresh)
    refs: int = 1
    last_use: int = 0
    dead: bool = False  # unreachable (its adapter was replaced, or its computation failed): freed at refs 0


class PrefixCache:
    def __init__(self, allocator: BlockAllocator, kv_pages: int = 2):
        self.allocator = allocator
        self.kv_pages = kv_pages   # blocks an entry holds: its K and V blocks, or one that holds both (FP8)
        self.block_size = allocator.block_size
        self._by_key: dict[tuple, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}   # K block id -> entry (a request holds block ids)
        self._lru: collections.OrderedDict[int, CachedBlock] = collections.OrderedDict()  # refs 0, oldest first
        self._ids = itertools.count(1)
        self._fresh: list[CachedBlock] = []           # registered since begin_step()
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0      # of which found cached
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        """Cached (K, V) block pairs, in use or evictable."""
        return len(self._by_key)

    @property
    def reclaimable_blocks(self) -> int:
        """Pool blocks eviction can free: the blocks of every unreferenced entry."""
        return self.kv_pages * len(self._lru)

    def oldest_use(self) -> int | None:
        return next(iter(self._lru.values())).last_use if self._lru else None

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def match(self, adapter_id: int, token_ids: list[int], max_tokens: int) -> list[CachedBlock]:
        """The longest cached chain of full blocks that starts `token_ids`, within max_tokens tokens
        (not acquired: see acquire)."""
        bs, parent, found = self.block_size, ROOT, []
        for j in range(max_tokens // bs):
            entry = self._by_key.get((parent, adapter_id, tuple(token_ids[j * bs: (j + 1) * bs])))
            if entry is None:
                break
            found.append(entry)
            parent = entry.id
        return found

    # -- references ------------------------------------------------------------------------------
    def acquire(self, entries: list[CachedBlock]) -> None:
        for entry in entries:
            entry.refs += 1
            self._lru.pop(entry.id, None)

    def release(self, k_blocks: list[int], v_blocks: list[int]) -> None:
        """A request lets go of its KV blocks: cached ones lose a reference (evictable at none, the
        chain's tail first), the others go back to the allocator."""
        own_k, own_v = [], []
        for k, v in zip(reversed(k_blocks), reversed(v_blocks)):
            entry = self._by_block.get(k)
            if entry is None:
                own_k.append(k)
                own_v.append(v)
                continue
            entry.refs -= 1
            assert entry.refs >= 0
            if entry.refs == 0:
                if entry.dead:
                    self._free(entry)
                else:
                    entry.last_use = next(lru_clock)
                    self._lru[entry.id] = entry
        self.allocator.free(kv_blocks(own_k, own_v, self.kv_pages))

    # -- registration ----------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._fresh = []

    def register(self, request, adapter_id: int, num_tokens: int) -> None:
        """Register the request's full blocks among its first num_tokens tokens (all_ids) that are not
        registered yet. request.cache_chain = (blocks registered, the last one's entry id) is its place in
        the chain. A block whose key is already cached (computed twice at once) stays the request's own."""
        done, parent = request.cache_chain
        if num_tokens // self.block_size <= done:
            return  # no new full block (most steps of a decoding request)
        bs, ids = self.block_size, request.all_ids
        for j in range(done, num_tokens // bs):
            key = (parent, adapter_id, tuple(ids[j * bs: (j + 1) * bs]))
            entry = self._by_key.get(key)
            if entry is None:
                k, v = request.k_blocks[j], request.v_blocks[j]
                assert k not in self._by_block, "a block registered twice"
                entry = CachedBlock(next(self._ids), key, k, v, request)
                self._by_key[key] = self._by_block[k] = entry
                self._fresh.append(entry)
            parent = entry.id
            done = j + 1
        request.cache_chain = (done, parent)

    def kill_fresh(self, request) -> set[int]:
        """The step that was to compute the request's fresh blocks failed: unregister them (whoever holds
        them keeps them until released). Returns their K block ids."""
        killed = set()
        for entry in self._fresh:
            if entry.owner is request and not entry.dead:
                self._kill(entry)
                killed.add(entry.k_block)
        return killed

    def drop_adapter(self, uid: int) -> None:
        """An adapter version left (unregistered or replaced): its blocks (salted or not) are never
        matched again."""
        def owned(identity) -> bool:
            return identity == uid or (isinstance(identity, tuple) and identity[0] == uid)

        for entry in [e for e in self._by_key.values() if owned(e.key[1])]:
            self._kill(entry)

    def clear(self) -> None:
        """The pool's contents were lost: nothing cached is valid."""
        for entry in list(self._by_key.values()):
            self._kill(entry)

    # -- eviction --------------------------------------------------------------------------------
    def evict_oldest(self) -> None:
        _, entry = self._lru.popitem(last=False)
        del self._by_key[entry.key]
        self._free(entry)
        self.evictions += 1

    def evict_until(self, free_blocks: int) -> bool:
        """Evict until the allocator has free_blocks free (the no-unified baseline: KV has blocks of its own)."""
        if self.allocator.num_free + self.reclaimable_blocks < free_blocks:
            return False
        while self.allocator.num_free < free_blocks:
            self.evict_oldest()
        return True

    def _kill(self, entry: CachedBlock) -> None:
        del self._by_key[entry.key]
        entry.dead = True
        if entry.refs == 0:
            del self._lru[entry.id]
            self._free(entry)

    def _free(self, entry: CachedBlock) -> None:
        del self._by_block[entry.k_block]
        self.allocator.free(kv_blocks([entry.k_block], [entry.v_block], self.kv_pages))
