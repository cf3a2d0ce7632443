"""The device side of the engine: weights, the unified pool, the sampled-token slots, the step shapes
(buckets) and the jitted step (decode rows and prompt chunks in one launch). Everything that lives on
the GPU is here; the host side (requests, scheduling, adapters' host tier) is in Engine and
AdapterManager.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jslora.config import LORA_TARGETS, ModelConfig
from jslora.engine.batch import BatchShapes, Chunk, StepBatch, prompt_logprob_rows, sampled_requests, step_batch
from jslora.engine.config import EngineConfig
from jslora.engine.sizes import EngineSizes, adapter_copy_pages, adapter_copy_sizes
from jslora.memory import AdapterResidency, BlockTables
from jslora.model.backend import BACKENDS, Backend
from jslora.model.llama import fuse_projections, layer_partition_names, unstack_layers
from jslora.model.packing import pack_batch
from jslora.model.paged import PagedSpec, init_slot_state, jitted_step, row_logprobs, step, write_adapter_pages
from jslora.model.quant import SCALE_SUFFIX, quantize_params
from jslora.parallel import TP_AXIS, local_config, make_mesh, shard_params
from jslora.request import Request
from jslora.sampling import SamplingParams
from jslora.scheduler.rows import launched_rows
from pallas_kernels.pool import TILE, PoolLayout

log = logging.getLogger("jslora.engine")


def _filtered(samplings: list[SamplingParams]) -> bool:
    """Whether some sampled row uses top-k, top-p or logprobs (the step variant that sorts the vocabulary)."""
    return any(sp.needs_sort for sp in samplings)


class ModelRunner:
    def __init__(self, params, model_config: ModelConfig, dtype, config: EngineConfig, sizes: EngineSizes,
                 backend: Backend | None = None):
        cfg, tp = model_config, config.tensor_parallel_size
        self.model_config, self.dtype, self.config, self.sizes = model_config, jnp.dtype(dtype), config, sizes
        self.params = unstack_layers(params)
        self.mesh = make_mesh(tp) if tp > 1 else None
        if self.mesh is not None:
            local_config(cfg, tp)  # heads and MLP must split evenly: fail here, not inside a step
            self.params = shard_params(self.params, self.mesh, cfg)
        # fused in place: a caller holding params (LLM, a benchmark) sees the fused layout too, so the
        # weights are never held twice
        fuse_projections(self.params, cfg, tp, None if self.mesh is None else
                         NamedSharding(self.mesh, P(None, TP_AXIS, None)))
        if config.quantization == "fp8":  # in place too, before the pool takes what memory is left
            quantize_params(self.params, None if self.mesh is None else self._quantized_shardings)
        num_pages = config.num_pages or self._pages_that_fit()
        num_pages = num_pages // config.kv_block * config.kv_block
        self.layout = PoolLayout(cfg.num_layers, num_pages, cfg.kv_width)
        self.spec = PagedSpec(cfg, num_pages, config.kv_block, backend or BACKENDS[config.kernels], mesh=self.mesh,
                              fp8_gemm=config.fp8_gemm, eager=config.enforce_eager, pdl=config.pdl,
                              concurrent_graphs=config.concurrent_graphs,
                              rematerialization=config.xla_rematerialization,
                              decode_lora_tiling=config.decode_lora_tiling or (), fused_rope=config.fused_rope,
                              fused_norm=config.fused_norm, kv_fp8=config.kv_cache_dtype == "fp8")
        self.reset()
        self.decode_buckets, self.step_buckets = sizes.decode_buckets, sizes.step_buckets
        self._compiled: set = set()  # step variants launched so far (a new one compiles)
        self.compiles = 0
        self._copy_shapes: set[int] = set()  # adapter copy sizes compiled (write_adapter)
        self.compiles_at_warmup: int | None = None  # compiles when warm-up ended (None: no warm-up)
        self.last_rows = 0           # rows of the last launched step, padding included
        self.dispatch_seconds = 0.0  # inside the jitted step calls (a call that blocks shows here)
        self.targets: tuple[str, ...] = config.lora_targets or ()  # LoRA targets the steps compute

    def _quantized_shardings(self, name: str) -> tuple:
        """Where a quantized projection's FP8 weight and its scales live under tensor parallelism."""
        names = layer_partition_names(self.model_config, quantized=True)
        return tuple(NamedSharding(self.mesh, P(*names[n])) for n in (name, name + SCALE_SUFFIX))

    def _pages_that_fit(self) -> int:
        cfg, c = self.model_config, self.config
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:  # CPU: no budget to read; room for a few full-length sequences
            if jax.default_backend() != "cpu":  # e.g. XLA's VMM allocator: say so rather than serve small
                log.warning("the device's allocator reports no memory budget: the pool holds only a few "
                            "sequences; set num_pages (--num-pages) to size it")
            return 2 * 8 * self.sizes.max_model_len + 16 * 1024
        # activations of the largest step (MLP in f32 dominates) plus the sampled rows' logits
        activations = self.sizes.max_num_batched_tokens * (3 * cfg.intermediate_size + 8 * cfg.hidden_size) * 4 \
            + 4 * c.max_batch * cfg.vocab_size * 4 + (c.max_batch + 1) * cfg.vocab_size * 5  # + slot_state
        free = stats["bytes_limit"] * c.gpu_memory_utilization - stats["bytes_in_use"] - activations
        page_bytes = cfg.num_layers * cfg.kv_width * self.dtype.itemsize // c.tensor_parallel_size  # per device
        if free < page_bytes * 1024:
            raise MemoryError(f"only {free / 2**30:.2f} GiB left for the pool: lower max_batch or "
                              f"max_num_batched_tokens, or raise gpu_memory_utilization")
        return int(free // page_bytes)

    def reset(self) -> None:
        """A zero pool and token slots (at start, and after a failed step lost the donated pool)."""
        pool_sharding = None if self.mesh is None else NamedSharding(self.mesh, P(None, TP_AXIS))
        self.pool = jnp.zeros(self.layout.shape, self.dtype, device=pool_sharding)
        self.slot_state = init_slot_state(self.config.max_batch, self.model_config.vocab_size,
                                          None if self.mesh is None else NamedSharding(self.mesh, P()))

    def release(self) -> None:
        """Drop every device buffer (a benchmark running several engines one after another)."""
        self.pool = self.slot_state = self.params = None

    @property
    def pool_lost(self) -> bool:
        return self.pool.is_deleted()

    def add_targets(self, targets) -> None:
        """Grow the LoRA targets the steps compute (a new target set compiles new step variants)."""
        if self.config.lora_targets is None:
            self.targets = tuple(t for t in LORA_TARGETS if t in self.targets or t in targets)

    def shapes(self) -> BatchShapes:
        s = self.sizes
        return BatchShapes(s.kv_block, s.max_blocks, s.max_batch, self.targets, decode_tile=s.decode_lora_tile,
                           eos_ids=tuple(self.model_config.eos_token_ids))

    # -- steps -----------------------------------------------------------------------------------
    def launched_rows(self, num_decode: int, chunks: list[Chunk]) -> int:
        """Rows the step is launched with: its bucket, decode-only or with chunks (jslora.scheduler.rows)."""
        return launched_rows(num_decode, [c.length for c in chunks], self.decode_buckets, self.step_buckets, TILE)

    def step_batch(self, decode: list[Request], chunks: list[Chunk], residency: AdapterResidency,
                   block_tables: BlockTables | None = None) -> StepBatch:
        """The batch of one step: the decode-only variant when there are no chunks. block_tables: the
        scheduler's (else the requests' block lists are read)."""
        n = self.launched_rows(len(decode), chunks)
        return step_batch(decode, chunks, n, self.shapes(), residency, with_prefill=bool(chunks),
                          block_tables=block_tables)

    def run(self, batch: StepBatch, filtered: bool = False) -> tuple[jax.Array, tuple | None, jax.Array]:
        """Launch one step (asynchronously); returns its sampled tokens, already on their way to the host,
        with filtered, their logprobs (sampled [R], top ids and logprobs [R, K]), on their way too, and
        the rows' hidden states (on the device)."""
        variant = (filtered, self.targets, tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch)))
        if variant not in self._compiled:
            self._compiled.add(variant)
            self.compiles += 1
        self.last_rows = batch.num_rows
        t0 = time.perf_counter()
        self.pool, self.slot_state, tokens, logprobs, hidden = step(self.params, self.spec, self.pool,
                                                                    self.slot_state, batch, filtered=filtered)
        self.dispatch_seconds += time.perf_counter() - t0
        # queue the copy of its tokens now, behind this step only: asked for later, the copy could
        # wait behind the next step too
        tokens.copy_to_host_async()
        if not filtered:
            return tokens, None, hidden
        for x in logprobs:
            x.copy_to_host_async()
        return tokens, logprobs, hidden

    def prompt_logprobs(self, hidden: jax.Array, rows: np.ndarray, tokens: np.ndarray) -> tuple:
        """Logprobs of tokens [M] at rows [M] of a step's hidden states (launched, not waited for),
        padded to the step's rows (a shape per step bucket, compiled at warm-up)."""
        n = hidden.shape[0]
        padded_rows, padded_tokens = np.zeros(n, np.int32), np.zeros(n, np.int32)
        padded_rows[: len(rows)], padded_tokens[: len(tokens)] = rows, tokens
        variant = ("prompt_logprobs", n)
        if variant not in self._compiled:
            self._compiled.add(variant)
            self.compiles += 1
        out = row_logprobs(self.params, self.model_config, hidden, padded_rows, padded_tokens)
        for x in out:
            x.copy_to_host_async()
        return out

    def launch(self, decode: list[Request], chunks: list[Chunk], residency: AdapterResidency,
               block_tables: BlockTables | None = None) -> tuple:
        """One step of these decode rows and prompt chunks: (its tokens [R] and, if any row asks, their
        logprobs (see run), in sampled_requests' order; the prompt logprobs its chunks' rows give, if
        any request asks, as (PromptLogprobRows, (logprobs, top ids, top logprobs)), else None)."""
        batch = self.step_batch(decode, chunks, residency, block_tables)
        tokens, logprobs, hidden = self.run(batch, _filtered([r.sampling for r in sampled_requests(decode, chunks)]))
        scored = prompt_logprob_rows(len(decode), chunks)
        prompt = None if scored is None else (scored, self.prompt_logprobs(hidden, scored.rows, scored.tokens))
        return tokens, logprobs, prompt

    def warmup(self, residency: AdapterResidency, max_adapter_pages: int = TILE, progress: bool = True,
               filtered: bool = True) -> float:
        """Compile every step variant a request can need: each bucket, decode-only and with chunks, with
        the plain sampler and the one that sorts for top-k / top-p (padding-only steps: they read the
        null page and write nothing). After this, requests compile nothing (Engine.compiles_after_warmup)
        unless an adapter with new LoRA targets is registered. filtered=False leaves out the sorting
        sampler's variants (half the compile time; a request that needs one compiles it, counted).
        With several compile threads (EngineConfig.compile_threads; by default up to 8 on a GPU, 2 on the CPU) the
        variants compile that many at a time first (S1's 20 variants of a 7B step: 146 s one by one, 88 s
        eight at a time on an H200), then each runs once."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        jobs = [(False, b) for b in self.decode_buckets] + [(True, n) for n in self.step_buckets]
        jobs = [(chunks, size, sorts) for chunks, size in jobs for sorts in ((False, True) if filtered else (False,))]
        batches = [(step_batch([], [], size, self.shapes(), residency, with_prefill=with_prefill), sorts)
                   for with_prefill, size, sorts in jobs]
        threads = self.config.compile_threads or min(8 if jax.default_backend() == "gpu" else 2, os.cpu_count() or 1)
        if threads > 1:
            self.compile_steps(batches, threads, progress)
        for batch, sorts in tqdm(batches, desc="running steps", disable=not progress, unit="shape"):
            _, _, hidden = self.run(batch, filtered=sorts)
            if batch.prefill is not None and not sorts:  # prompt logprobs (steps with chunks): once per bucket
                self.prompt_logprobs(hidden, np.zeros(0, np.int32), np.zeros(0, np.int32))
            hidden.block_until_ready()
        # every adapter copy size too (each a power of two pages, up to the largest adapter), writing
        # nothing: all their pages are the null page
        for n in adapter_copy_sizes(max_adapter_pages):
            self.write_adapter(np.zeros(0, np.int32),
                               self.adapter_rows(np.zeros((self.layout.num_layers, n, self.layout.page_width),
                                                          self.dtype)))
        jax.block_until_ready(self.pool)
        self.compiles_at_warmup = self.compiles
        return time.perf_counter() - t0

    def compile_steps(self, batches: list[tuple[StepBatch, bool]], threads: int, progress: bool = False) -> None:
        """Compile these step variants (batch, filtered) ahead, `threads` at a time (lowered against the
        live pool and slots, which compiling neither reads nor donates: so a later run of the same variant
        finds its executable). A variant that fails to compile here is left to compile when it first runs
        (where its error is raised)."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        pool, slot_state = self.pool, self.slot_state

        def compile_one(job):
            batch, filtered = job
            buffers, layout = pack_batch(batch)
            try:
                jitted_step(batch.num_rows, self.spec.eager, self.spec.pdl, self.spec.concurrent_graphs,
                            self.spec.rematerialization).lower(
                    self.params, self.spec, pool, slot_state, buffers, layout, filtered=filtered).compile()
            except Exception:  # noqa: BLE001 - compiled again, and raised, when the variant first runs
                pass

        with ThreadPoolExecutor(threads) as workers:
            list(tqdm(workers.map(compile_one, batches), total=len(batches), desc="compiling steps",
                      disable=not progress, unit="shape"))

    # -- adapters' pool rows -----------------------------------------------------------------------
    def adapter_rows(self, page_data: np.ndarray | jax.Array) -> jax.Array:
        """An adapter's pool rows [L, n, W] on the device, padded to a power of two pages (few compiled
        copy shapes). Thread-safe: adapters about to be installed are staged on a worker thread."""
        if isinstance(page_data, jax.Array):  # the host tier's pinned copy, padded there: one DMA
            device = next(iter(page_data.devices()))
            return jax.device_put(page_data, jax.sharding.SingleDeviceSharding(device, memory_kind="device"))
        count = page_data.shape[1]
        n = adapter_copy_pages(count)
        if n != count:  # the host tier pads already (AdapterStore); anything else is padded here
            data = np.zeros((self.layout.num_layers, n, self.layout.page_width), page_data.dtype)
            data[:, :count] = page_data
            page_data = data
        return jax.device_put(page_data)

    def write_adapter(self, pages: np.ndarray, rows: jax.Array) -> None:
        """Copy adapter rows (from adapter_rows) onto their pool pages, in place."""
        if rows.shape[1] not in self._copy_shapes:  # a copy size not seen before compiles its copy
            self._copy_shapes.add(rows.shape[1])
            self.compiles += 1
        padded_pages = np.zeros(rows.shape[1], np.int32)
        padded_pages[: len(pages)] = pages
        # NumPy straight into the jitted copy (an eager jnp.asarray is one more dispatch per load)
        self.pool = write_adapter_pages(self.pool, self.layout, padded_pages, rows)
