"""The engine loop over a ModelRunner (device state, jitted steps) and an AdapterManager (adapter tiers).

One `step()`: apply queued commands (new requests, aborts, adapter changes), schedule, launch one
device step with the decode rows and the prompt chunks together (asynchronously: JAX returns before
the device finishes), start adapter prefetches, and only then read back the token ids of the
*previous* step's launch. So the host
builds step n+1 while the device runs step n; a request that finished in step n wastes at most one
row of step n+1. Sampled tokens stay on the device (`slot_state`) to feed the next decode step.
With EngineConfig.steps_in_flight = N the host reads a step's tokens N launches later (N - 1 more
rows wasted by a finished request, N steps' time for one slow host iteration).
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import time
import uuid
from collections.abc import Callable

import numpy as np

from jslora.config import LORA_TARGETS, ModelConfig
from jslora.engine.adapter_manager import AdapterManager
from jslora.engine.adapter_store import AdapterEntry
from jslora.engine.batch import sampled_requests
from jslora.engine.config import EngineConfig
from jslora.engine.model_runner import ModelRunner
from jslora.engine.sizes import EngineSizes
from jslora.engine.stats import EngineStats, StepRecord
from jslora.memory import BlockAllocator, PrefixCache
from jslora.model.backend import Backend
from jslora.request import Chunk, Request, RequestOutput, RequestUpdate, Status, check_request
from jslora.sampling import SamplingParams
from jslora.scheduler import Scheduler, make_policy
from jslora.scheduler.policies import Policy
from pallas_kernels.pool import TILE

log = logging.getLogger("jslora.engine")


def _local(x) -> np.ndarray:
    """A replicated device array on the host (under several processes, this process's copy)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


class Engine:
    """Requests in, updates out: the inbox of thread-safe commands, the step loop (schedule, launch,
    collect), the requests' host state and the stats. The device state is the ModelRunner's
    (`engine.runner`), the adapters' tiers the AdapterManager's (`engine.adapters`)."""

    def __init__(self, params, model_config: ModelConfig, dtype, config: EngineConfig | None = None, *,
                 detokenize: Callable[[list[int]], str] | None = None, seed: int = 0,
                 backend: Backend | None = None, allocators: Callable[[int, int], tuple] | None = None,
                 policy: Policy | None = None):
        """The baselines of jslora.bench.baselines replace parts through three hooks. backend: the
        attention and LoRA implementations, if not config.kernels'. policy: the scheduling policy, if
        not config.policy's. allocators(num_blocks, kv_block) -> (kv, adapters): the pool's block
        allocators, if not S-LoRA's unified pool (one allocator for both, idle adapters evicted to
        make room for KV)."""
        cfg = model_config
        config = config or EngineConfig()
        self.model_config, self.config = model_config, config
        self.detokenize = detokenize
        self.sizes = sizes = EngineSizes.resolve(cfg, config)
        self.runner = ModelRunner(params, cfg, dtype, config, sizes, backend)

        num_blocks = self.runner.layout.num_pages // config.kv_block
        if allocators is None:
            self.allocator = adapter_allocator = BlockAllocator(num_blocks, config.kv_block)
        else:
            self.allocator, adapter_allocator = allocators(num_blocks, config.kv_block)
        self.unified_pool = adapter_allocator is self.allocator
        self.adapters = AdapterManager(cfg, config, self.runner, adapter_allocator, sizes.max_lora_rank,
                                       busy=lambda: bool(self.scheduler.running or self._in_flight),
                                       unified_pool=self.unified_pool)
        # cached prompt blocks are KV: they live in the KV allocator, evicted in one LRU with idle adapters
        self.prefix_cache = (PrefixCache(self.allocator, config.kv_pages_per_token) if config.enable_prefix_caching
                             else None)
        if self.prefix_cache is not None and self.unified_pool:
            self.residency.caches.append(self.prefix_cache)
        self.scheduler = Scheduler(
            self.allocator, self.adapters.residency, max_batch=config.max_batch,
            max_num_batched_tokens=sizes.max_num_batched_tokens, prefill_tile=TILE,
            watermark_blocks=int(config.watermark * self.allocator.capacity),
            policy=policy or make_policy(config.policy, slo_s=config.slo_s), load_adapter=self.adapters.load,
            adapter_ready=self.adapters.ready, unified_pool=self.unified_pool, prefix_cache=self.prefix_cache,
            kv_pages=config.kv_pages_per_token, max_blocks=sizes.max_blocks,
            step_buckets=sizes.step_buckets, fit_from=config.fit_chunks_from)

        self._rng = np.random.default_rng(seed)
        # unique across engines too (the merged baseline runs several): a random prefix, then a count
        self._id_prefix, self._request_ids = uuid.uuid4().hex[:6], itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # commands from other threads
        self._requests: dict[str, Request] = {}
        # launched steps whose tokens are not read yet, oldest first: each the list of launches of one step
        # (a failed launch is split in parts), each launch (sampled requests, tokens, logprobs, prompt)
        self._in_flight: collections.deque[list[tuple]] = collections.deque()
        self.stats = EngineStats()
        self.timeline: list[StepRecord] | None = None  # a list: every step is recorded there (benchmarks)
        self._lost_blocks: set[int] = set()  # prefix blocks a failed launch of this step did not compute

    # shorthands for what callers read most
    @property
    def store(self):
        return self.adapters.store

    @property
    def residency(self):
        return self.adapters.residency

    @property
    def layout(self):
        return self.runner.layout

    @property
    def max_model_len(self) -> int:
        return self.sizes.max_model_len

    @property
    def max_lora_rank(self) -> int:
        return self.sizes.max_lora_rank

    # -- adapters --------------------------------------------------------------------------------
    def register_adapter(self, name: str, source, lazy: bool = False) -> AdapterEntry:
        """Validate and register (thread-safe); a new version under an existing name replaces it. lazy: a
        PEFT directory's weights are read when first used (AdapterStore.register)."""
        entry, old = self.adapters.register(name, source, lazy)
        self._inbox.put(("registered", entry, old))
        return entry

    def unregister_adapter(self, name: str) -> None:
        old = self.adapters.unregister(name)
        self._inbox.put(("registered", None, old))

    def _prefetch(self) -> None:
        waiting = self.scheduler.policy.order(self.scheduler.waiting, time.monotonic())
        spare = (self.allocator.num_free - self.scheduler.watermark_blocks if self.unified_pool
                 else self.residency.allocator.num_free)
        self.adapters.prefetch(waiting, spare)

    def set_policy(self, name: str, **options) -> None:
        """Switch the scheduling policy (between workloads: only with nothing queued or running)."""
        if self.has_unfinished():
            raise RuntimeError("set_policy needs an idle engine")
        self.scheduler.policy = make_policy(name, **{"slo_s": self.config.slo_s, **options})
        self.scheduler.policy.bind(self.scheduler)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                    adapter: str | None = None, *, request_id: str | None = None, client: str | None = None,
                    on_update: Callable[[RequestUpdate], None] | None = None, arrival: float | None = None,
                    cache_salt: str | None = None) -> Request:
        """Queue a request (thread-safe). Raises KeyError for an unknown adapter, ValueError for a bad prompt.
        cache_salt: the request shares cached prompt blocks only with requests of the same salt."""
        sampling = sampling or SamplingParams()
        prompt_ids = check_request(prompt_ids, sampling, self.model_config.vocab_size, self.max_model_len)
        entry = self.store.get(adapter) if adapter is not None else None
        blocks = self.config.kv_pages_per_token * self.sizes.kv_blocks_for(len(prompt_ids) + sampling.max_tokens)
        if entry is not None and self.unified_pool:
            blocks += self.residency.blocks_for_pages(entry.num_pages)
        if blocks > self.allocator.capacity - self.scheduler.watermark_blocks:
            raise ValueError(f"the request needs {blocks} page blocks; the pool has {self.allocator.capacity}")
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(2**31))
        request_id = request_id or f"req-{self._id_prefix}-{next(self._request_ids)}"
        request = Request(request_id, prompt_ids, sampling, entry, seed,
                          client=client or adapter, on_update=on_update, cache_salt=cache_salt)
        if arrival is not None:
            request.arrival = arrival
        self._inbox.put(("add", request))
        return request

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe): it finishes with reason "abort" and its pages are freed."""
        self._inbox.put(("abort", request_id))

    def num_queued(self) -> int:
        """Requests submitted and not yet admitted (thread-safe enough for an overload check)."""
        return len(self.scheduler.waiting) + self._inbox.qsize()


    def has_unfinished(self) -> bool:
        return bool(self._requests) or not self._inbox.empty() or bool(self._in_flight)

    def _drain_inbox(self, updates: list[RequestUpdate]) -> None:
        while True:
            try:
                command, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                (request,) = args
                self._requests[request.request_id] = request
                self.scheduler.add(request)
            elif command == "abort":
                request = self._requests.get(args[0])
                if request is not None and request.status is not Status.FINISHED:
                    self.stats.aborted += 1
                    updates.append(self._finish(request, "abort"))
            elif command == "registered":
                self.adapters.on_registered(*args)
                old = args[1]
                if old is not None and self.prefix_cache is not None:
                    self.prefix_cache.drop_adapter(old.uid)  # never served again; freed when unused

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        t0 = time.perf_counter()
        updates: list[RequestUpdate] = []
        self._drain_inbox(updates)
        plan = self.scheduler.schedule()
        for request, reason in plan.dropped:
            self.stats.dropped += 1
            updates.append(self._finish(request, "abort", error=reason))
        for request, reason in self.adapters.take_unservable():
            if request.status is not Status.FINISHED:
                updates.append(self._finish(request, "abort", error=f"adapter {request.adapter_name!r} cannot "
                                                                     f"be loaded: {reason}", error_status=400))
        compiles, rows, dispatch = self.runner.compiles, 0, self.runner.dispatch_seconds
        self._lost_blocks = set()
        launched = self._launch_isolated(plan.decode + plan.chunks, updates) if plan else []
        if launched:
            rows = self.runner.last_rows
        self._prefetch()
        self.stats.steps += 1
        host = time.perf_counter() - t0
        self.stats.host_seconds += host
        wait = self.stats.wait_seconds
        if launched:
            self._in_flight.append(launched)
        # read the oldest steps' tokens, leaving steps_in_flight launched (with nothing launched, all:
        # what the next plan needs may be in them)
        while len(self._in_flight) > (self.config.steps_in_flight if launched else 0):
            updates += self._collect(self._in_flight.popleft())
        if self.timeline is not None:
            self.timeline.append(StepRecord(
                t0, host, self.stats.wait_seconds - wait, len(plan.decode), len(plan.chunks),
                sum(c.length for c in plan.chunks), rows, self.runner.compiles - compiles, time.perf_counter(),
                self.runner.dispatch_seconds - dispatch, plan.num_adapters))
        return updates

    def _launch_isolated(self, items: list, updates: list[RequestUpdate]) -> list:
        """Launch one step of these decode rows (Requests) and prompt chunks (Chunks); if it fails before
        the pool is donated (a bad request's metadata, a compile error), the items are split in halves
        and retried, so a failure ends only the requests it belongs to; a request that was to read
        prefix blocks the failed one was computing goes back to the queue (recomputed later). A failure
        after donation lost the pool: see recover_device_state."""
        items = [x for x in items if not self._lost_prefix(x)]
        if not items:
            return []
        try:
            return [self._launch(items)]
        except Exception as e:  # noqa: BLE001 - isolate, then report to the requests concerned
            if self.runner.pool_lost:
                raise
            if len(items) == 1:
                request = items[0].request if isinstance(items[0], Chunk) else items[0]
                self.stats.step_failures += 1
                log.exception("a step of request %s failed", request.request_id)
                if self.prefix_cache is not None:
                    self._lost_blocks |= self.prefix_cache.kill_fresh(request)
                updates.append(self._finish(request, "abort", error=f"internal error: {type(e).__name__}: {e}",
                                            error_status=500))
                return []
        half = len(items) // 2
        return self._launch_isolated(items[:half], updates) + self._launch_isolated(items[half:], updates)

    def _lost_prefix(self, item) -> bool:
        """Whether the item's request shares blocks a failed launch of this step did not compute: if so
        it is preempted (its tokens are recomputed when it is admitted again)."""
        request = item.request if isinstance(item, Chunk) else item
        if not self._lost_blocks or self._lost_blocks.isdisjoint(request.k_blocks):
            return False
        self.scheduler.preempt(request)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (vLLM's reset_prefix_cache; benchmarks between runs)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def recover_device_state(self, error: str) -> list[RequestUpdate]:
        """After a step failed on the device (the donated pool is gone): fail the running requests,
        which lost their KV, and start over with an empty pool; queued requests go on."""
        updates = []
        for request in list(self.scheduler.running):
            updates.append(self._finish(request, "abort", error=error, error_status=500))
        for launched in self._in_flight:  # their tokens will never arrive (a preempted, queued request
            for requests, *_ in launched:    # waits for its pending tokens before readmission)
                for request in requests:
                    request.pending -= 1
        self._in_flight.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # the KV it names is gone
        self.adapters.evict_all()  # no request holds an adapter now
        self.runner.reset()
        return updates

    def _launch(self, items: list) -> tuple[list[Request], object, object, object]:
        decode = [x for x in items if isinstance(x, Request)]
        chunks = [x for x in items if isinstance(x, Chunk)]
        tokens, logprobs, prompt = self.runner.launch(decode, chunks, self.residency, self.scheduler.block_tables)
        sampled = sampled_requests(decode, chunks)
        for r in decode:
            r.num_computed += 1
        for c in chunks:
            c.request.num_computed = c.start + c.length
            self.stats.prompt_tokens += c.length
        for r in sampled:
            r.pending += 1
        self.stats.prefill_steps += bool(chunks)
        self.stats.decode_steps += bool(decode)
        return sampled, tokens, logprobs, prompt

    def _collect(self, launched) -> list[RequestUpdate]:
        updates = []
        for requests, tokens, logprobs, prompt in launched:
            t0 = time.perf_counter()
            # tokens are replicated: under several processes (multi-host TP) read the local copy
            host_tokens = _local(tokens)
            if logprobs is not None and any(r.sampling.logprobs is not None for r in requests):
                chosen, top_ids, top_values = (_local(x) for x in logprobs)
            else:
                logprobs = None
            if prompt is not None:  # prompt logprobs, by prompt position (a recomputation writes them again)
                scored, device_logprobs = prompt
                scored.record(*(_local(x) for x in device_logprobs))
            self.stats.wait_seconds += time.perf_counter() - t0
            now = time.monotonic()
            for row, (request, token) in enumerate(zip(requests, host_tokens.tolist())):
                request.pending -= 1
                if request.status is Status.FINISHED:
                    continue  # finished or aborted while this token was in flight
                self.stats.generated_tokens += 1
                request.first_token_time = request.first_token_time or now
                if logprobs is not None and request.sampling.logprobs is not None:
                    k = request.sampling.logprobs
                    request.logprobs.append((float(chosen[row]), top_ids[row, :k].tolist(),
                                             top_values[row, :k].tolist()))
                reason = request.append_token(token, self.model_config.eos_token_ids, self.detokenize)
                self.scheduler.on_token(request, now)
                if reason is not None:
                    updates.append(self._finish(request, reason, new_tokens=[token]))
                else:
                    new_logprobs = request.logprobs[-1:] if request.sampling.logprobs is not None else None
                    prompt_logprobs = request.prompt_logprob_list() if len(request.generated) == 1 else None
                    updates.append(self._notify(RequestUpdate(request.request_id, [token], False,
                                                              new_logprobs=new_logprobs,
                                                              prompt_logprobs=prompt_logprobs), request))
        return updates

    def _finish(self, request: Request, reason: str, new_tokens=(), error: str | None = None,
                error_status: int = 503) -> RequestUpdate:
        """error: why the engine ended it (a policy drop: 503; a failed step: 500; an adapter that
        cannot be loaded: 400), given to the client with error_status."""
        request.finish_reason, request.error = reason, error
        request.error_status = error_status if error else None
        request.finish_time = time.monotonic()
        self.scheduler.finish(request)
        self._requests.pop(request.request_id, None)
        self.stats.finished += reason != "abort"
        output = self.output(request)
        return self._notify(RequestUpdate(request.request_id, list(new_tokens), True, reason, output), request)

    @staticmethod
    def _notify(update: RequestUpdate, request: Request) -> RequestUpdate:
        if request.on_update is not None:
            request.on_update(update)
        return update

    def output(self, request: Request) -> RequestOutput:
        ids = request.generated
        if request.stop_text is not None:
            text = request.stop_text
        elif self.detokenize is None:
            text = ""
        else:
            stop_token = request.ends_with_stop_token(self.model_config.eos_token_ids)
            text = self.detokenize(ids[:-1] if stop_token else ids)
        metrics = {"arrival": request.arrival, "first_token_time": request.first_token_time,
                   "finish_time": request.finish_time, "preemptions": request.num_preemptions}
        logprobs = list(request.logprobs[: len(ids)]) if request.sampling.logprobs is not None else None
        return RequestOutput(list(request.prompt_ids), list(ids), text, request.finish_reason,
                             request.adapter_name, request.request_id, metrics, request.error, request.error_status,
                             logprobs, request.prompt_logprob_list())

    # -- start-up --------------------------------------------------------------------------------
    def warmup(self, progress: bool = True, filtered: bool = True) -> float:
        """Compile every step shape (ModelRunner.warmup); returns the seconds it took. Adapter
        registrations queued so far are applied first: their LoRA targets are part of every variant.
        filtered=False: not the top-k/top-p sampler's variants (a benchmark whose requests are greedy)."""
        updates: list[RequestUpdate] = []
        self._drain_inbox(updates)  # nothing is running yet: adds and aborts only queue or finish requests
        # the largest adapter this engine may load: the copy sizes up to it are compiled too
        targets = self.config.lora_targets or LORA_TARGETS
        largest = self.adapters.partition.pages_needed({t: self.max_lora_rank for t in targets})
        runner = self.runner
        log.info("compiling the step for %d decode-only row counts %s and %d with prompt chunks %s%s",
                 len(runner.decode_buckets), runner.decode_buckets, len(runner.step_buckets), runner.step_buckets,
                 ", each with the plain and the sorting sampler" if filtered else "")
        seconds = runner.warmup(self.residency, largest, progress, filtered)
        log.info("step variants compiled in %.1f s", seconds)
        self.stats.compile_seconds += seconds
        return seconds

    def close(self) -> None:
        """Stop the adapter threads and drop the device state (benchmarks run engines one after another)."""
        self.adapters.close()
        self.runner.release()
        self._in_flight.clear()

    # -- introspection ---------------------------------------------------------------------------
    @property
    def compiles_after_warmup(self) -> int:
        """Step variants compiled since warm-up ended (a server should see 0; without a warm-up: all)."""
        return self.runner.compiles - (self.runner.compiles_at_warmup or 0)

    def memory_stats(self) -> dict:
        adapter_blocks = self.residency.blocks_in_use
        cache = self.prefix_cache
        cached_idle = cache.reclaimable_blocks if cache is not None else 0  # evictable, held by no request
        stats = {
            "pool_blocks": self.allocator.capacity, "free_blocks": self.allocator.num_free,
            "kv_blocks": self.allocator.capacity - self.allocator.num_free - adapter_blocks - cached_idle,
            "adapter_blocks": adapter_blocks, "block_pages": self.config.kv_block,
            "adapters_on_gpu": len(self.residency.resident), "adapters_on_host": self.store.host_resident,
            "adapter_loads": self.residency.loads, "adapter_evictions": self.residency.evictions,
            "adapter_source_loads": self.store.source_loads, "preemptions": self.scheduler.num_preemptions,
            "fitted_steps": self.scheduler.num_fitted_steps,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
        }
        if cache is not None:  # cached (K, V) block pairs (in use or idle), idle blocks, and vLLM's counters
            stats.update(prefix_cache_blocks=cache.num_cached_blocks, prefix_cache_idle_blocks=cached_idle,
                         prefix_cache_queried_tokens=cache.queried_tokens,
                         prefix_cache_hit_tokens=cache.hit_tokens, prefix_cache_hit_rate=cache.hit_rate(),
                         prefix_cache_evictions=cache.evictions)
        return stats
