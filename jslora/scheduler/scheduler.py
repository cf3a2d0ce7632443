"""Iteration-level batching (Orca-style) over the unified pool.

Each engine step the scheduler (1) makes room for one more token of every running request that is
decoding, preempting the newest running request (its KV is freed and it is recomputed later) when the
pool runs out; (2) gives the running requests still prefilling their next prompt chunk; then (3) admits
waiting requests in the policy's order while there are batch slots, rows left in the step's budget
(max_num_batched_tokens: decode rows plus chunks, as vLLM's chunked prefill counts them) and free pages
for the request's tokens plus its adapter (unreferenced adapters are evicted, least recently used
first). A prompt longer than what is left of the budget is split into chunks across steps, so decode
rows never wait behind it. Given the step's compiled row counts (step_buckets), a step whose rows would
be padded up to the next one, where padding costs matmul time, launches the bucket below instead: the
last chunk gives back the rows over it, to a later step. With a prefix cache, an admitted request starts
from its longest cached prefix (those blocks are shared, not copied), and every request's full blocks
are registered as the step that computes them is planned. It is pure host logic over the allocator and
the adapter residency, so it runs the same under a simulated clock.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from jslora.memory import AdapterResidency, BlockAllocator, BlockTables, kv_blocks
from jslora.memory.prefix_cache import BASE_MODEL, ROOT, PrefixCache
from jslora.request import Chunk, Request, Status
from jslora.scheduler.policies import FCFS
from jslora.scheduler.rows import COMPUTE_BOUND_ROWS, step_rows
from pallas_kernels.pool import round_up


@dataclasses.dataclass
class StepPlan:
    decode: list[Request] = dataclasses.field(default_factory=list)
    chunks: list[Chunk] = dataclasses.field(default_factory=list)   # prompt chunks, one per request at most
    preempted: list[Request] = dataclasses.field(default_factory=list)
    dropped: list[tuple[Request, str]] = dataclasses.field(default_factory=list)  # by the policy, with why

    @property
    def prefill(self) -> list[Request]:
        return [c.request for c in self.chunks]

    @property
    def num_adapters(self) -> int:
        """Distinct adapters among the step's rows: the LoRA rows the step reads grow with it."""
        return len({r.adapter.uid for r in self.decode + self.prefill if r.adapter is not None})

    def __bool__(self):
        return bool(self.chunks or self.decode)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, residency: AdapterResidency, *, max_batch: int,
                 max_num_batched_tokens: int, prefill_tile: int = 16, watermark_blocks: int = 0, policy=None,
                 load_adapter: Callable[[Request, int], bool] | None = None,
                 adapter_ready: Callable[[Request], bool] | None = None, clock=time.monotonic,
                 unified_pool: bool = True, prefix_cache: PrefixCache | None = None, kv_pages: int = 2,
                 max_blocks: int | None = None, step_buckets: tuple[int, ...] | None = None,
                 fit_from: int = COMPUTE_BOUND_ROWS):
        """load_adapter(request, extra_blocks) installs the request's adapter in the pool, keeping
        `extra_blocks` free beside it, and returns False if it cannot. adapter_ready(request) is False
        while the adapter's weights are still being read from disk: such a request is passed over
        (the ones behind it are admitted), where a lack of memory stops admission. prefix_cache: KV
        blocks kept for reuse (in the unified pool, residency.caches lists it so that it shares the LRU).
        kv_pages: blocks a block of tokens takes, 2 (keys and values apart) or 1 (an FP8 cache: one both).
        max_blocks: the width of the block tables kept per batch slot (block_tables; None: none kept).
        step_buckets: the row counts steps with prompt chunks are compiled for; given, a step that would be
        padded up to one is cut to the bucket below it if that has fit_from rows or more (_fit_to_bucket;
        fit_from 0: never)."""
        self.allocator, self.residency = allocator, residency
        self.max_batch, self.max_num_batched_tokens = max_batch, max_num_batched_tokens
        self.prefill_tile, self.watermark_blocks = prefill_tile, watermark_blocks
        self.policy = policy or FCFS()
        self.policy.bind(self)
        self.load_adapter = load_adapter
        self.adapter_ready = adapter_ready or (lambda request: True)
        self.clock = clock
        # True: adapters and KV share the allocator (S-LoRA's unified pool), so making room for KV may
        # evict idle adapters; False: the no-unified baseline's adapters have blocks of their own
        self.unified_pool = unified_pool
        self.prefix_cache = prefix_cache
        self.kv_pages = kv_pages
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self.num_preemptions = 0
        self.num_fitted_steps = 0  # steps whose last chunk was cut to fit a bucket (_fit_to_bucket)
        # the running requests' K and V block ids by batch slot: a step's tables in one gather
        self.block_tables = BlockTables(max_batch, max_blocks) if max_blocks else None
        self.step_buckets, self.fit_from = step_buckets, fit_from
        self._held: Chunk | None = None  # the step's last chunk, registered once its length is final

    # -- queue -----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.policy.on_arrival(request, self.waiting, self.running)
        self.waiting.append(request)

    def on_token(self, request: Request, now: float) -> None:
        """A token of the request reached the host (the policy's service accounting)."""
        self.policy.on_tokens(request, 1)
        if len(request.generated) == 1:
            self.policy.on_first_token(request, now)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan a step. Requests in plan.dropped are still queued: the caller finishes them."""
        self._held = None  # a plan that raised midway launched nothing: its chunk must not be registered
        plan = StepPlan(dropped=self.policy.drop(self.waiting, self.clock()))
        dropped = {id(r) for r, _ in plan.dropped}
        if self.prefix_cache is not None:
            self.prefix_cache.begin_step()
        for request in sorted((r for r in self.running if r.wants_decode_row()), key=lambda r: r.arrival):
            while request.status is Status.RUNNING and not self._grow(request, request.num_computed + 1):
                victim = max(self.running, key=lambda r: r.arrival)
                self.preempt(victim)
                plan.preempted.append(victim)
            if request.status is Status.RUNNING:
                plan.decode.append(request)
        plan.decode = [r for r in plan.decode if r.status is Status.RUNNING]  # a victim may be listed
        for request in plan.decode:  # the blocks this step fills, as far as the host knows their tokens
            self._register(request, min(request.num_computed + 1, request.num_tokens))
        budget = self.max_num_batched_tokens - round_up(len(plan.decode), self.prefill_tile)
        for request in [r for r in self.running if r.is_prefilling()]:  # in admission order
            chunk = self._chunk(request, budget)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            self._hold(chunk)
            budget -= round_up(chunk.length, self.prefill_tile)
        if not plan.preempted:  # memory is short: let the running requests drain first
            plan.chunks += self._admit(dropped, budget)
        if self.step_buckets is not None and self.fit_from:
            self._fit_to_bucket(plan)
        self._hold(None)
        return plan

    def _fit_to_bucket(self, plan: StepPlan) -> None:
        """Cut the last chunk so the step's rows fill the bucket below, where the padding up to the next one
        would cost matmul time (fit_from rows and up: where the GEMMs are compute-bound). The cut tokens
        are computed in a later step, so no work is lost, and this one launches no padding. Only the last
        chunk is cut, and only while its blocks are unregistered (no request matched them, _cached_prefix)."""
        if not plan.chunks:
            return
        tile = self.prefill_tile
        rows = step_rows(len(plan.decode), [c.length for c in plan.chunks], tile)
        floor = max((b for b in self.step_buckets if b <= rows), default=0)
        if floor == rows or floor < self.fit_from:
            return
        last = plan.chunks[-1]
        kept = round_up(last.length, tile) - (rows - floor)
        # it keeps a tile at least, so its request still advances (by a chunk that no longer ends its prompt)
        if kept >= tile and (self.prefix_cache is None or self._held is last):
            plan.chunks[-1] = self._held = dataclasses.replace(last, length=kept)
            self.num_fitted_steps += 1

    def _chunk(self, request: Request, budget: int) -> Chunk | None:
        """The request's next prompt chunk within budget rows: the rest of its prompt, or as many whole
        tiles as fit (None if not one does)."""
        start = request.num_computed
        remaining = request.prefill_target - start
        if round_up(remaining, self.prefill_tile) <= budget:
            return Chunk(request, start, remaining)
        length = budget // self.prefill_tile * self.prefill_tile
        return Chunk(request, start, length) if length > 0 else None

    def _admit(self, dropped: set, budget: int) -> list[Chunk]:
        chunks, now = [], self.clock()
        for request in self.policy.order([r for r in self.waiting if id(r) not in dropped], now):
            if len(self.running) >= self.max_batch or request.pending or budget < self.prefill_tile:
                break
            if not self.adapter_ready(request):
                continue  # waiting on a disk read, not on memory: it must not hold up the queue
            if not self._reserve(request):
                break
            self.waiting.remove(request)
            request.status = Status.RUNNING
            request.batch_slot = self._free_slots.pop()
            if self.block_tables is not None:
                self.block_tables.assign(request.batch_slot, request.k_blocks, request.v_blocks)
            request.admit_time = now
            request.prefill_target = len(request.all_ids)
            self.running.append(request)
            self.policy.on_admit(request)
            chunk = self._chunk(request, budget)
            chunks.append(chunk)
            self._hold(chunk)
            budget -= round_up(chunk.length, self.prefill_tile)
        return chunks

    def _hold(self, chunk: Chunk | None) -> None:
        """Register the chunk held so far (later admissions may share its blocks at once) and hold this one:
        the step's last chunk may still be cut (_fit_to_bucket), so it is registered once that is decided,
        or when a request about to be admitted would share its blocks (_cached_prefix)."""
        if self._held is not None:
            self._register(self._held.request, self._held.start + self._held.length)
        self._held = chunk

    def _register(self, request: Request, num_tokens: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.register(request, self._adapter_id(request), num_tokens)

    @staticmethod
    def _adapter_id(request: Request):
        """Whose KV a request's blocks are: the adapter version (uid), and the request's salt if any."""
        uid = BASE_MODEL if request.adapter is None else request.adapter.uid
        return uid if request.cache_salt is None else (uid, request.cache_salt)

    def _cached_prefix(self, request: Request) -> list:
        """The cached blocks the request may start from: at most all but its last token (whose logits
        it samples); none if its sampling reads the token history the prefill rows build (penalties)."""
        if self.prefix_cache is None or request.sampling.computes_whole_prompt:
            return []
        ids, adapter_id = request.all_ids, self._adapter_id(request)
        found = self.prefix_cache.match(adapter_id, ids, len(ids) - 1)
        if self._held is not None and self._continues_held(adapter_id, ids, found):
            self._hold(None)  # register the held chunk's blocks, so the match goes on into them (no cut then)
            found = self.prefix_cache.match(adapter_id, ids, len(ids) - 1)
        return found

    def _continues_held(self, adapter_id, ids: list[int], found: list) -> bool:
        """Whether the held chunk's blocks (not registered yet) would extend this match: it ends where the
        held request's registered chain ends, and its next block is the held request's next one."""
        held, bs, j = self._held.request, self.allocator.block_size, len(found)
        return (self._adapter_id(held) == adapter_id and (found[-1].id if found else ROOT) == held.cache_chain[1]
                and (j + 1) * bs <= len(ids) - 1 and ids[j * bs:(j + 1) * bs] == held.all_ids[j * bs:(j + 1) * bs])

    def _reserve(self, request: Request) -> bool:
        """Pages for the request's tokens (after its cached prefix) and its adapter (installed now if it
        is not resident)."""
        cached = self._cached_prefix(request)
        if self.prefix_cache is not None:
            self.prefix_cache.acquire(cached)  # pinned: making room below must not evict them
        kv_blocks = self.kv_pages * (self.allocator.blocks_for(len(request.all_ids)) - len(cached))
        extra = kv_blocks + self.watermark_blocks
        adapter = request.adapter
        ok = adapter is None or self.residency.get(adapter.uid) is not None or self.load_adapter(request, extra)
        if ok and adapter is not None:
            self.residency.acquire(adapter.uid)  # pinned: making room below must not evict it
        if ok and not self._room_for_kv(extra):
            if adapter is not None:
                self.residency.release(adapter.uid)
            ok = False
        if not ok:
            if cached:
                self.prefix_cache.release([e.k_block for e in cached], [e.v_block for e in cached])
            return False
        request.k_blocks, request.v_blocks = [e.k_block for e in cached], [e.v_block for e in cached]
        request.num_computed = request.cached_tokens = len(cached) * self.allocator.block_size
        request.cache_chain = (len(cached), cached[-1].id if cached else 0)
        if self.prefix_cache is not None:  # vLLM's counters: tokens of admitted requests, and of those cached
            self.prefix_cache.queried_tokens += len(request.all_ids)
            self.prefix_cache.hit_tokens += request.num_computed
        ok = self._grow(request, len(request.all_ids))
        assert ok, "room was made above"
        return True

    def _room_for_kv(self, num_blocks: int) -> bool:
        """num_blocks free for KV: in the unified pool, by evicting idle adapters if need be."""
        if self.unified_pool:
            return self.residency.make_room(num_blocks)  # the prefix cache's blocks among the evictable
        if self.prefix_cache is not None:
            return self.prefix_cache.evict_until(num_blocks)
        return self.allocator.num_free >= num_blocks

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give the request K and V blocks for num_tokens tokens, evicting idle adapters if needed."""
        need = self.allocator.blocks_for(num_tokens) - len(request.k_blocks)
        if need <= 0:
            return True
        if not self._room_for_kv(self.kv_pages * need):
            return False
        keys = self.allocator.allocate(need)
        values = keys if self.kv_pages == 1 else self.allocator.allocate(need)
        if self.block_tables is not None and request.batch_slot is not None:  # admitted: its rows are kept
            self.block_tables.extend(request.batch_slot, len(request.k_blocks), keys, values)
        request.k_blocks += keys
        request.v_blocks += values
        return True

    # -- leaving the running set -----------------------------------------------------------------
    def _release(self, request: Request) -> None:
        if self.prefix_cache is not None:  # cached blocks stay (evictable once nobody holds them)
            self.prefix_cache.release(request.k_blocks, request.v_blocks)
        else:
            self.allocator.free(kv_blocks(request.k_blocks, request.v_blocks, self.kv_pages))
        request.k_blocks, request.v_blocks, request.cache_chain = [], [], (0, 0)
        if request.status is Status.RUNNING:
            if request.adapter is not None:
                self.residency.release(request.adapter.uid)
            self._free_slots.append(request.batch_slot)
            request.batch_slot = None
            self.running.remove(request)
        request.num_computed = request.prefill_target = 0

    def preempt(self, request: Request) -> None:
        """Free the request's KV and put it back in the queue, to be recomputed from its tokens."""
        self._release(request)
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """The request is done (or aborted): free everything it holds."""
        if request.status is Status.WAITING:
            self.waiting.remove(request)
        elif request.status is Status.RUNNING:
            self._release(request)
        request.status = Status.FINISHED
