"""The engine: a unified page pool on the device, host-side memory and scheduling, jitted steps.

One `step()`: apply queued commands (new requests, aborts, adapter changes), schedule, launch the
prefill and decode steps (asynchronously: JAX returns before the device finishes), start adapter
prefetches, and only then read back the token ids of the *previous* step's launches. So the host
builds step n+1 while the device runs step n; a request that finished in step n wastes at most one
row of step n+1. Sampled tokens stay on the device (`slot_tokens`) to feed the next decode step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import itertools
import logging
import queue
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jslora.config import LORA_TARGETS, ModelConfig
from jslora.engine.adapter_store import AdapterEntry, AdapterStore
from jslora.engine.batch import BatchShapes, decode_meta, prefill_meta, prefill_tokens
from jslora.engine.config import EngineConfig
from jslora.loading.peft_adapter import AdapterError
from jslora.memory import AdapterResidency, BlockAllocator
from jslora.model.llama import unstack_layers
from jslora.model.paged import PREFILL_TILE, PagedSpec, decode_step, prefill_step, write_adapter_pages
from jslora.parallel import TP_AXIS, local_config, make_mesh, shard_params
from jslora.parallel.lora_partition import local_shapes
from jslora.request import Request, RequestOutput, RequestUpdate, Status, check_prompt_ids
from jslora.sampling import SamplingParams
from jslora.scheduler import Scheduler, make_policy
from pallas_kernels.pool import PoolLayout

log = logging.getLogger("jslora.engine")

# process-wide, so that requests of several engines (the merged baseline) never share an id
_REQUEST_IDS = itertools.count()


def powers_of_two(lo: int, hi: int) -> list[int]:
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    return out + [hi]


def _filtered(requests: list[Request]) -> bool:
    """Whether some sampled row uses top-k or top-p (the step variant that sorts the vocabulary)."""
    return any(r.sampling.temperature > 0 and (r.sampling.top_k > 0 or r.sampling.top_p < 1) for r in requests)


def bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0       # tokens prefilled (recomputation after preemption included)
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    dropped: int = 0             # by the scheduling policy (early abort)
    host_seconds: float = 0.0    # scheduling, metadata and dispatch
    wait_seconds: float = 0.0    # blocked on the device's tokens
    compile_seconds: float = 0.0
    step_failures: int = 0       # requests ended by a failed step (their own: see Engine._launch_isolated)


class Engine:
    def __init__(self, params, model_config: ModelConfig, dtype, config: EngineConfig | None = None, *,
                 detokenize: Callable[[list[int]], str] | None = None, seed: int = 0):
        self.params, self.model_config, self.dtype = unstack_layers(params), model_config, jnp.dtype(dtype)
        cfg = model_config
        self.config = config = config or EngineConfig()
        self.detokenize = detokenize
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_model_len = -(-self.max_model_len // config.kv_block) * config.kv_block
        max_prefill = max(config.max_prefill_tokens, self.max_model_len)
        tp = config.tensor_parallel_size
        # the kernels' rank block is 16, on each device's share of a column-parallel rank under TP
        self.max_lora_rank = -(-config.max_lora_rank // (16 * tp)) * 16 * tp

        self.mesh = make_mesh(tp) if tp > 1 else None
        if self.mesh is not None:
            local_config(cfg, tp)  # heads and MLP must split evenly: fail here, not inside a step
            self.params = shard_params(self.params, self.mesh)
        num_pages = config.num_pages or self._pages_that_fit(max_prefill)
        num_pages = num_pages // config.kv_block * config.kv_block
        self.layout = PoolLayout(cfg.num_layers, num_pages, cfg.kv_width)
        self.spec = PagedSpec(cfg, num_pages, config.kv_block, config.kernels, mesh=self.mesh,
                              lora_communication=config.lora_communication)
        if self.mesh is None:
            self.pool = jnp.zeros(self.layout.shape, self.dtype)
            self.slot_tokens = jnp.zeros((config.max_batch,), jnp.int32)
        else:  # each device holds its KV heads' columns of every page
            self.pool = jnp.zeros(self.layout.shape, self.dtype, device=NamedSharding(self.mesh, P(None, TP_AXIS)))
            self.slot_tokens = jnp.zeros((config.max_batch,), jnp.int32, device=NamedSharding(self.mesh, P()))

        num_blocks = num_pages // config.kv_block
        if config.unified_pool:
            self.allocator = adapter_allocator = BlockAllocator(num_blocks, config.kv_block)
        else:  # the no-unified baseline: a fixed adapter buffer beside the KV cache, neither can borrow
            split = num_blocks - max(1, int(config.adapter_pool_share * num_blocks))
            self.allocator = BlockAllocator(num_blocks, config.kv_block, range(1, split))
            adapter_allocator = BlockAllocator(num_blocks, config.kv_block, range(split, num_blocks))
        local_layout = PoolLayout(cfg.num_layers, num_pages, cfg.kv_width // tp)  # one device's page slice
        chunks = {t: (local_layout.chunks(local_shapes(cfg, t, 1, tp)[1]),
                      local_layout.chunks(local_shapes(cfg, t, 1, tp)[3]))
                  for t in LORA_TARGETS}
        self.residency = AdapterResidency(adapter_allocator, config.max_adapters, self.max_lora_rank, chunks, tp=tp)
        self.store = AdapterStore(cfg, self.layout, config.max_lora_rank, self.dtype, config.host_adapter_bytes,
                                  allowed_targets=config.lora_targets, tp=tp, load_workers=config.adapter_load_workers)
        # host -> device copies of adapters about to be installed (uid -> future of the device rows)
        self._stager = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-stage")
        self._staged: collections.OrderedDict[int, concurrent.futures.Future] = collections.OrderedDict()
        self.scheduler = Scheduler(
            self.allocator, self.residency, max_batch=config.max_batch, max_prefill_tokens=max_prefill,
            prefill_tile=PREFILL_TILE, watermark_blocks=int(config.watermark * self.allocator.capacity),
            policy=make_policy(config.policy, slo_s=config.slo_s), load_adapter=self._load_adapter,
            adapter_ready=self._adapter_ready)
        # few shapes, so start-up compiles few variants: padding a decode batch of 2 to 4 costs
        # nothing next to the weights it reads, and small prefills share the 64-token shape
        self.decode_buckets = ([1] + powers_of_two(4, config.max_batch) if config.max_batch > 4
                               else powers_of_two(1, config.max_batch))
        self.prefill_buckets = powers_of_two(min(64, max_prefill), max_prefill)
        self._targets: tuple[str, ...] = config.lora_targets or ()

        self._rng = np.random.default_rng(seed)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # commands from other threads
        self._requests: dict[str, Request] = {}
        self._in_flight: list[tuple[list[Request], jax.Array]] = []
        # requests whose adapter could not be read (request_id -> (request, why)): failed after scheduling
        self._unservable: dict[str, tuple[Request, str]] = {}
        self.stats = EngineStats()

    def _pages_that_fit(self, max_prefill: int) -> int:
        cfg, c = self.model_config, self.config
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:  # CPU: no budget to read; room for a few full-length sequences
            return 2 * 8 * self.max_model_len + 16 * 1024
        # activations of the largest prefill step (MLP in f32 dominates) plus decode logits
        activations = max_prefill * (3 * cfg.intermediate_size + 8 * cfg.hidden_size) * 4 \
            + 4 * c.max_batch * cfg.vocab_size * 4
        free = stats["bytes_limit"] * c.gpu_memory_utilization - stats["bytes_in_use"] - activations
        page_bytes = cfg.num_layers * cfg.kv_width * self.dtype.itemsize // c.tensor_parallel_size  # per device
        if free < page_bytes * 1024:
            raise MemoryError(f"only {free / 2**30:.2f} GiB left for the pool: lower max_batch or "
                              f"max_prefill_tokens, or raise gpu_memory_utilization")
        return int(free // page_bytes)

    # -- adapters --------------------------------------------------------------------------------
    def register_adapter(self, name: str, source) -> AdapterEntry:
        """Validate and register (thread-safe); a new version under an existing name replaces it."""
        entry, old = self.store.register(name, source)
        self._inbox.put(("registered", entry, old))
        return entry

    def unregister_adapter(self, name: str) -> None:
        old = self.store.unregister(name)
        self._inbox.put(("registered", None, old))

    def _on_registered(self, entry: AdapterEntry | None, old: AdapterEntry | None) -> None:
        if old is not None:
            self.residency.retire(old.uid)  # running requests keep it until they finish
        if entry is not None and self.config.lora_targets is None:
            grown = tuple(t for t in LORA_TARGETS if t in self._targets or t in entry.targets)
            self._targets = grown  # a new target set compiles new step variants

    def _adapter_ready(self, request: Request) -> bool:
        """False while the request's adapter is still on its way from disk and other requests keep
        the device busy: the scheduler then admits the requests behind it rather than wait."""
        entry = request.adapter
        if entry is None or self.residency.get(entry.uid) is not None:
            return True
        error = self.store.load_error(entry)
        if error is not None:  # its file went bad after registration: fail it, not the queue
            self._unservable[request.request_id] = (request, error)
            return False
        if self.store.is_on_host(entry):
            self._stage(entry)
            return True
        if not (self.scheduler.running or self._in_flight):
            return True  # nothing to overlap the read with: _load_adapter reads it now
        self.store.prefetch(entry)
        return False

    def _load_adapter(self, request: Request, extra_blocks: int) -> bool:
        """Install the request's adapter in the pool (the scheduler admits it next)."""
        entry = request.adapter
        if not self.config.unified_pool:
            extra_blocks = 0  # KV lives elsewhere
        if not self.residency.make_room(self.residency.blocks_for_pages(entry.num_pages) + extra_blocks,
                                        need_slot=True):
            return False
        try:
            host = self.store.host_copy(entry)
        except (AdapterError, OSError, ValueError) as e:
            self._unservable[request.request_id] = (request, self.store.load_error(entry) or str(e))
            return False
        self._install(entry, host)
        return True

    def _device_rows(self, host) -> jax.Array:
        """The adapter's pool rows on the device, padded to a power of two pages (few compiled copy shapes)."""
        count = host.page_data.shape[1]
        n = bucket(count, powers_of_two(16, max(16, count)))
        data = np.zeros((self.layout.num_layers, n, self.layout.page_width), host.page_data.dtype)
        data[:, :count] = host.page_data
        return jax.device_put(data)

    def _stage(self, entry: AdapterEntry) -> None:
        """Start the host -> device copy of an adapter about to be installed, on a worker thread, so
        the step loop does not pay for padding and transferring hundreds of MB."""
        if entry.uid in self._staged:
            return
        self._staged[entry.uid] = self._stager.submit(self._device_rows, self.store.host_copy(entry))
        while len(self._staged) > self.config.prefetch_depth:  # bounded device memory outside the pool
            self._staged.popitem(last=False)

    def _install(self, entry: AdapterEntry, host) -> None:
        _, pages = self.residency.install(entry.uid, host.index, entry.num_pages)
        staged = self._staged.pop(entry.uid, None)
        data = staged.result() if staged is not None else self._device_rows(host)
        padded_pages = np.zeros(data.shape[1], np.int32)
        padded_pages[: len(pages)] = pages
        self.pool = write_adapter_pages(self.pool, self.layout, jnp.asarray(padded_pages), data)

    def _prefetch(self) -> None:
        """Start loading the adapters of the next queued requests: disk -> host in a thread, and
        host -> pool pages (an async device copy) when there are blocks to spare without evicting."""
        waiting = self.scheduler.policy.order(self.scheduler.waiting, time.monotonic())
        unified = self.config.unified_pool
        spare = self.allocator.num_free - self.scheduler.watermark_blocks if unified \
            else self.residency.allocator.num_free
        for request in itertools.islice(waiting, self.config.prefetch_depth):
            if unified:
                spare -= 2 * -(-len(request.all_ids) // self.config.kv_block)
            entry = request.adapter
            if entry is None or self.residency.get(entry.uid) is not None:
                continue
            if self.store.load_error(entry) is not None:
                continue
            if not self.store.is_on_host(entry):
                self.store.prefetch(entry)
                continue
            self._stage(entry)
            need = self.residency.blocks_for_pages(entry.num_pages)
            if need <= spare and self.residency.free_slots:
                self._install(entry, self.store.host_copy(entry))
                spare -= need

    def set_policy(self, name: str, **options) -> None:
        """Switch the scheduling policy (between workloads: only with nothing queued or running)."""
        if self.has_unfinished():
            raise RuntimeError("set_policy needs an idle engine")
        self.scheduler.policy = make_policy(name, **{"slo_s": self.config.slo_s, **options})
        self.scheduler.policy.bind(self.scheduler)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                    adapter: str | None = None, *, request_id: str | None = None, client: str | None = None,
                    on_update: Callable[[RequestUpdate], None] | None = None, arrival: float | None = None) -> Request:
        """Queue a request (thread-safe). Raises KeyError for an unknown adapter, ValueError for a bad prompt."""
        sampling = sampling or SamplingParams()
        prompt_ids = check_prompt_ids(prompt_ids, self.model_config.vocab_size)
        if len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds "
                             f"the context length {self.max_model_len}")
        entry = self.store.get(adapter) if adapter is not None else None
        blocks = 2 * -(-(len(prompt_ids) + sampling.max_tokens) // self.config.kv_block)
        if entry is not None and self.config.unified_pool:
            blocks += self.residency.blocks_for_pages(entry.num_pages)
        if blocks > self.allocator.capacity - self.scheduler.watermark_blocks:
            raise ValueError(f"the request needs {blocks} page blocks; the pool has {self.allocator.capacity}")
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(2**31))
        request = Request(request_id or f"req-{next(_REQUEST_IDS)}", prompt_ids, sampling, entry, seed,
                          client=client or adapter, on_update=on_update)
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
                self._on_registered(*args)

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        t0 = time.perf_counter()
        updates: list[RequestUpdate] = []
        self._drain_inbox(updates)
        plan = self.scheduler.schedule()
        for request, reason in plan.dropped:
            self.stats.dropped += 1
            updates.append(self._finish(request, "abort", error=reason))
        for request, reason in self._unservable.values():
            if request.status is not Status.FINISHED:
                updates.append(self._finish(request, "abort", error=f"adapter {request.adapter_name!r} cannot "
                                                                     f"be loaded: {reason}", error_status=400))
        self._unservable.clear()
        launched = []
        if plan.prefill:
            launched += self._launch_isolated(self._launch_prefill, plan.prefill, updates)
        if plan.decode:
            launched += self._launch_isolated(self._launch_decode, plan.decode, updates)
        self._prefetch()
        self.stats.steps += 1
        self.stats.host_seconds += time.perf_counter() - t0
        updates += self._collect(self._in_flight)
        self._in_flight = launched
        return updates

    def _launch_isolated(self, launch, requests: list[Request], updates: list[RequestUpdate]) -> list:
        """launch(requests); if it fails before the pool is donated (a bad request's metadata, a
        compile error), the requests are split in halves and retried, so a failure ends only the
        requests it belongs to. A failure after donation lost the pool: see recover_device_state."""
        try:
            return [launch(requests)]
        except Exception as e:  # noqa: BLE001 - isolate, then report to the requests concerned
            if self.pool.is_deleted():
                raise
            if len(requests) == 1:
                self.stats.step_failures += 1
                log.exception("a step of request %s failed", requests[0].request_id)
                updates.append(self._finish(requests[0], "abort", error=f"internal error: {type(e).__name__}: {e}",
                                            error_status=500))
                return []
        half = len(requests) // 2
        return (self._launch_isolated(launch, requests[:half], updates)
                + self._launch_isolated(launch, requests[half:], updates))

    def recover_device_state(self, error: str) -> list[RequestUpdate]:
        """After a step failed on the device (the donated pool is gone): fail the running requests,
        which lost their KV, and start over with an empty pool; queued requests go on."""
        updates = []
        for request in list(self.scheduler.running):
            updates.append(self._finish(request, "abort", error=error, error_status=500))
        self._in_flight = []
        self.residency.make_room(self.allocator.capacity)  # no request holds an adapter now: evict all
        sharding = None if self.mesh is None else NamedSharding(self.mesh, P(None, TP_AXIS))
        self.pool = jnp.zeros(self.layout.shape, self.dtype, device=sharding)
        self.slot_tokens = jnp.zeros((self.config.max_batch,), jnp.int32,
                                     device=None if self.mesh is None else NamedSharding(self.mesh, P()))
        return updates

    def _shapes(self) -> BatchShapes:
        # under tensor parallelism a tile per row: its LoRA all-gather then carries one row per token
        return BatchShapes(self.config.kv_block, self.max_model_len // self.config.kv_block,
                           self.config.max_batch, self._targets,
                           decode_tile=self.config.decode_lora_tile if self.spec.tp == 1 else 1)

    def _launch_prefill(self, requests: list[Request]):
        n = bucket(sum(prefill_tokens(r) for r in requests), self.prefill_buckets)
        meta = prefill_meta(requests, n, self._shapes(), self.residency)
        self.pool, self.slot_tokens, tokens = prefill_step(self.params, self.spec, self.pool, self.slot_tokens, meta,
                                                           filtered=_filtered(requests))
        tokens.copy_to_host_async()
        for r in requests:
            self.stats.prompt_tokens += len(r.all_ids)
            r.num_computed = len(r.all_ids)
            r.pending += 1
        self.stats.prefill_steps += 1
        return requests, tokens

    def _launch_decode(self, requests: list[Request]):
        meta = decode_meta(requests, bucket(len(requests), self.decode_buckets), self._shapes(), self.residency)
        self.pool, self.slot_tokens, tokens = decode_step(self.params, self.spec, self.pool, self.slot_tokens, meta,
                                                          filtered=_filtered(requests))
        # queue the copy of its tokens now, behind this step only: asked for later, the copy could
        # wait behind the next step too (not yet measured)
        tokens.copy_to_host_async()
        for r in requests:
            r.num_computed += 1
            r.pending += 1
        self.stats.decode_steps += 1
        return requests, tokens

    def _collect(self, launched) -> list[RequestUpdate]:
        updates = []
        for requests, tokens in launched:
            t0 = time.perf_counter()
            # tokens are replicated: under several processes (multi-host TP) read the local copy
            host_tokens = np.asarray(tokens if tokens.is_fully_addressable else tokens.addressable_data(0))
            self.stats.wait_seconds += time.perf_counter() - t0
            now = time.monotonic()
            for request, token in zip(requests, host_tokens.tolist()):
                request.pending -= 1
                if request.status is Status.FINISHED:
                    continue  # finished or aborted while this token was in flight
                self.stats.generated_tokens += 1
                request.first_token_time = request.first_token_time or now
                reason = request.append_token(token, self.model_config.eos_token_ids, self.detokenize)
                self.scheduler.on_token(request, now)
                if reason is not None:
                    updates.append(self._finish(request, reason, new_tokens=[token]))
                else:
                    updates.append(self._notify(RequestUpdate(request.request_id, [token], False), request))
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
            eos = bool(ids) and ids[-1] in self.model_config.eos_token_ids and not request.sampling.ignore_eos
            text = self.detokenize(ids[:-1] if eos else ids)
        metrics = {"arrival": request.arrival, "first_token_time": request.first_token_time,
                   "finish_time": request.finish_time, "preemptions": request.num_preemptions}
        return RequestOutput(list(request.prompt_ids), list(ids), text, request.finish_reason,
                             request.adapter_name, request.request_id, metrics, request.error, request.error_status)

    # -- start-up --------------------------------------------------------------------------------
    def warmup(self, progress: bool = True) -> float:
        """Compile every step bucket (padding-only steps: they read the null page and write nothing).
        Greedy / temperature sampling only: a step with top-k or top-p compiles on first use.
        `filtered` is passed as the steps are called (jit keys an explicit static argument apart
        from its default)."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        shapes = self._shapes()
        jobs = [("decode", b) for b in self.decode_buckets] + [("prefill", n) for n in self.prefill_buckets]
        for kind, size in tqdm(jobs, desc="compiling steps", disable=not progress, unit="shape"):
            if kind == "decode":
                meta = decode_meta([], size, shapes, self.residency)
                self.pool, self.slot_tokens, out = decode_step(self.params, self.spec, self.pool, self.slot_tokens,
                                                               meta,
                                                               filtered=False)
            else:
                meta = prefill_meta([], size, shapes, self.residency)
                self.pool, self.slot_tokens, out = prefill_step(self.params, self.spec, self.pool, self.slot_tokens,
                                                                meta,
                                                                filtered=False)
            out.block_until_ready()
        # what is alive now (weights, caches, compiled steps) lives as long as the engine: keep it out
        # of the cyclic collector's full passes, which otherwise stall the step loop now and then
        gc.collect()
        gc.freeze()
        self.stats.compile_seconds += time.perf_counter() - t0
        return time.perf_counter() - t0

    # -- introspection ---------------------------------------------------------------------------
    def memory_stats(self) -> dict:
        adapter_blocks = self.residency.blocks_in_use
        return {
            "pool_blocks": self.allocator.capacity, "free_blocks": self.allocator.num_free,
            "kv_blocks": self.allocator.capacity - self.allocator.num_free - adapter_blocks,
            "adapter_blocks": adapter_blocks, "block_pages": self.config.kv_block,
            "adapters_on_gpu": len(self.residency.resident), "adapters_on_host": self.store.host_resident,
            "adapter_loads": self.residency.loads, "adapter_evictions": self.residency.evictions,
            "adapter_source_loads": self.store.source_loads, "preemptions": self.scheduler.num_preemptions,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
        }
