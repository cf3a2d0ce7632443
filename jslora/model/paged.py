"""The Llama over the unified page pool: the same `decoder_layer`, with paged attention and the LoRA
kernels, and the jitted engine step (decode rows and prompt chunks in one launch: chunked prefill, so
the weights are read once per step) that reads and writes the pool in place.

KV pages come in blocks of `kv_block` consecutive page ids (block b = pages b*kv_block ..); a sequence's
cache is a block table per K and V, expanded to per-token page ids on the device. Block 0 is the null
block: padding entries point there and it is never written.

A step's batch is a jslora.engine.batch.StepBatch (frozen pytree dataclasses built on the host; their
docstrings list the fields). Prompt chunks run LoRA on tiles of 16 consecutive tokens of one sequence
(MBGMM); decode rows on gathered tiles of rows sharing an adapter (MBGMV on tiles).
"""
from __future__ import annotations

import dataclasses
from functools import cache, partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jslora.config import ModelConfig
from jslora.model.backend import BACKENDS, Backend
from jslora.model.layers import apply_rope, rope_cos_sin, rope_inv_freq
from jslora.model.llama import decoder_layer, logits_from_hidden
from jslora.model.packing import pack_batch, unpack_batch
from jslora.model.quant import DEFAULT_FP8_GEMM, fp8_matmul, fp8_matmul_by_rows, fp8_matmul_with_kernel
from jslora.parallel import TP_AXIS, local_config, param_specs
from jslora.parallel.lora_partition import is_column_parallel
from jslora.sampling import MAX_LOGPROBS, process_logits, sample, sample_unfiltered, top_logprobs
from pallas_kernels.kv_write import write_kv
from pallas_kernels.lora_expand import lora_expand
from pallas_kernels.lora_shrink import lora_shrink
from pallas_kernels.pool import TILE, write_pages
from pallas_kernels.rms_norm import add_rms_norm
from pallas_kernels.rope_kv import rope_write_kv

PREFILL_TILE = TILE  # tokens per prefill tile: one sequence and one adapter per tile (MBGMM's tile)


@dataclasses.dataclass(frozen=True)
class PagedSpec:
    """Everything static about the paged model (a jit static argument)."""
    cfg: ModelConfig
    num_pages: int
    kv_block: int = TILE
    backend: Backend = BACKENDS["pallas"]  # attention and LoRA implementations (jslora.model.backend)
    interpret: bool | None = None
    mesh: Mesh | None = None     # tensor parallelism over its "tp" axis (jslora.parallel)
    fp8_gemm: str = DEFAULT_FP8_GEMM  # how FP8 projections multiply: jslora.model.quant.FP8_GEMMS
    eager: bool = False          # no CUDA graphs: XLA launches the step's kernels one by one (jitted_step)
    pdl: bool = True             # programmatic dependent launch between XLA's kernels (jitted_step)
    concurrent_graphs: bool = False  # experimental: the CUDA graph ordered by data alone (jitted_step)
    rematerialization: bool = False  # XLA's rematerialization pass over the step (jitted_step)
    decode_lora_tiling: tuple = ()  # (option, value) pairs over backend.lora_tiling (EngineConfig's)
    fused_rope: bool = False     # rope and the K/V write in one kernel (pallas_kernels.rope_kv; Pallas backend)
    fused_norm: bool = False     # each residual add and RMSNorm in one kernel (pallas_kernels.rms_norm)
    kv_fp8: bool = False         # FP8 keys and values, a token's both on one page (pallas_kernels.kv_fp8)

    @property
    def tp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[TP_AXIS]

    @property
    def local_cfg(self) -> ModelConfig:
        """The shapes inside one device's shard of the step."""
        return self.cfg if self.tp == 1 else local_config(self.cfg, self.tp)


def _tensor_parallel(step, spec: PagedSpec, params, *args, outputs: int = 1):
    """Run step(params, pool, slot_state, batch) on every device of the mesh: weights and the pool's
    page columns split (jslora.parallel), the batch, the slots' state and the outputs replicated."""
    if spec.tp == 1:
        return step(params, *args)
    pool_spec = P(None, TP_AXIS)
    return jax.shard_map(step, mesh=spec.mesh, in_specs=(param_specs(params, spec.cfg), pool_spec, P(), P()),
                         out_specs=(pool_spec, P(), *[P()] * outputs), check_vma=False)(params, *args)


def token_pages(blocks, kv_block: int):
    """Block table [S, nb] -> per-token page ids [S, nb * kv_block]."""
    return (blocks[:, :, None] * kv_block + jnp.arange(kv_block, dtype=blocks.dtype)).reshape(blocks.shape[0], -1)


def _one_lora_launch(parts):
    """A mixed step's decode tiles and prompt tiles as one table, where their tiles are alike (16 rows):
    each LoRA kernel then launches once per group of targets, not once per kind of row, and the prompt
    tiles' few programs run in the decode tiles' waves (the H200 spent ~25 µs a layer on prompt rows'
    q, k, v alone, most of it launch and tail). Both index the step's rows; a row is in one live tile."""
    if len(parts) < 2:
        return parts
    (decode, _), (prompt, _) = parts
    if decode.tile_rows.shape[1] != prompt.tile_rows.shape[1] or set(decode.targets) != set(prompt.targets):
        return parts  # decode_lora_tile = 1: one-row decode tiles
    targets = {name: tuple(jnp.concatenate([d, p]) for d, p in zip(decode.targets[name], prompt.targets[name]))
               for name in decode.targets}
    tile_rows = jnp.concatenate([decode.tile_rows, prompt.tile_rows])
    return [(dataclasses.replace(decode, targets=targets, tile_rows=tile_rows), True)]


def _forward(params, spec: PagedSpec, pool, tokens, batch, attention):
    """Run the step's rows [N] through every layer; returns (hidden [N, H], pool)."""
    cfg = spec.local_cfg
    cos, sin = rope_cos_sin(batch.positions[None], rope_inv_freq(cfg))
    # LoRA per part: decode rows on tiles gathered by adapter, prompt chunks on tiles of 16 rows
    parts = [(batch.decode.lora, True)] + ([(batch.prefill.lora, False)] if batch.prefill is not None else [])
    parts = _one_lora_launch(parts)
    if batch.decode.lora.targets and spec.tp > 1 and not spec.backend.pallas_lora:
        raise NotImplementedError("under tensor parallelism LoRA runs on the Pallas kernels only")
    reduce = (lambda y: jax.lax.psum(y, TP_AXIS)) if spec.tp > 1 else None  # None: one device (DecoderLayer)
    row_max = (lambda m: jax.lax.pmax(m, TP_AXIS)) if spec.tp > 1 else None
    kernel_opts = dict(num_pages=spec.num_pages, interpret=spec.interpret)
    fused_rope = spec.fused_rope and spec.backend.pallas_attention

    def layer_step(x, pool, lp, layer):
        def attend(q, k, v, pool):  # q, k before rope (decoder_layer's attend_ropes)
            if fused_rope:
                q, pool = rope_write_kv(q[0], k[0], v[0], cos[0], sin[0], pool, layer, batch.write_k, batch.write_v,
                                        kv_fp8=spec.kv_fp8, **kernel_opts)
                return attention(q, pool, layer)[None], pool
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if spec.backend.finish_q_before_kv_write:
                q, k, v = jax.lax.optimization_barrier((q, k, v))
            n = q.shape[1]
            pool = write_kv(pool, layer, batch.write_k, batch.write_v, k.reshape(n, -1), v.reshape(n, -1),
                            kv_fp8=spec.kv_fp8, **kernel_opts)
            return attention(q[0], pool, layer)[None], pool

        def lora_fn(names, inp, outs, pool):
            for tables, decode in parts:
                live = [i for i, name in enumerate(names) if name in tables.targets]
                if not live:
                    continue
                targets = [tables.targets[names[i]] for i in live]  # (rank [tiles], a_pages, b_pages)
                tokens_per_tile = tables.tile_rows.shape[1]
                args = (inp[0], tuple(outs[i][0] for i in live), pool, layer,
                        jnp.stack([t[0] for t in targets], axis=1), tuple(t[1] for t in targets),
                        tuple(t[2] for t in targets), tables.tile_rows)
                if spec.tp > 1 and is_column_parallel(names[0]):
                    ys = _column_parallel_lora(*args, tp=spec.tp, tokens_per_tile=tokens_per_tile,
                                               gather=spec.backend.gather_rank_slices, **kernel_opts)
                else:  # one device, or row-parallel: partial sums join the all-reduce
                    ys = spec.backend.lora_group(*args, tokens_per_tile=tokens_per_tile, decode=decode,
                                                 decode_tiling=spec.decode_lora_tiling, **kernel_opts)
                outs = list(outs)
                for i, y in zip(live, ys):
                    outs[i] = y[None]
                outs = tuple(outs)
            return outs

        return decoder_layer(cfg, lp, x, cos, sin, pool, attend, lora_fn, reduce, quantized_matmul, row_max,
                             attend_ropes=True, add_norm=add_norm)

    quantized_matmul = {"auto": fp8_matmul_by_rows, "xla": fp8_matmul,
                        "xla-w8a8": partial(fp8_matmul, activations=True),
                        "pallas": partial(fp8_matmul_with_kernel, interpret=spec.interpret),
                        "pallas-w8a8": partial(fp8_matmul_with_kernel, interpret=spec.interpret, activations=True),
                        }[spec.fp8_gemm]

    # Layers unrolled over separate per-layer weights: under lax.scan over stacked weights XLA copies
    # each layer's slice before its matmuls, which tripled a decode step's HBM traffic on the H100.
    x = params["embed"][tokens][None]
    # fused_norm: the residual stream as (residual, the add the next norm does), the last add done here
    add_norm = partial(add_rms_norm, eps=cfg.rms_norm_eps, interpret=spec.interpret) if spec.fused_norm else None
    x = (x, None) if spec.fused_norm else x
    for layer, lp in enumerate(params["layers"]):
        x, pool = layer_step(x, pool, lp, jnp.int32(layer))
    if spec.fused_norm:
        residual, pending = x
        x = residual + pending
    return x[0], pool


def _column_parallel_lora(x, ys, pool, layer, ranks, a_pages, b_pages, tile_rows, *, tp: int, tokens_per_tile: int,
                          num_pages: int, interpret, gather):
    """S-LoRA's column-parallel LoRA (jslora.parallel.lora_partition): each device shrinks with its
    rank slice of A, one all-gather of the [tokens, rank] slices, then each expands into its own
    output columns. ranks [tiles, T] are padded to multiples of tp."""
    opts = dict(num_pages=num_pages, tokens_per_tile=tokens_per_tile, interpret=interpret)
    num_targets = len(ys)
    max_rank = b_pages[0].shape[2]
    slice_rank = max_rank // tp
    local = ranks // tp
    v = lora_shrink(x, pool, layer, local, jnp.concatenate(a_pages, axis=2), tile_rows, **opts)[0]
    n = v.shape[0]  # tile rows
    v = v.reshape(n, num_targets, slice_rank)
    v = gather(v, tp)
    # columns past a device's rank slice were never written (they may hold anything; 0 * NaN = NaN)
    written = jnp.arange(max_rank) % slice_rank < jnp.repeat(local, tokens_per_tile, axis=0)[:, :, None]
    v = jnp.where(written, v, 0.0).reshape(1, n, num_targets * max_rank)
    expand_rank = jnp.where(ranks > 0, (tp - 1) * slice_rank + local, 0)
    return lora_expand(v, ys, pool, layer, expand_rank, b_pages, tile_rows, **opts)


def _sample(logits, sp, filtered: bool):
    args = (logits, sp.temperature, sp.top_k, sp.top_p, sp.seed, sp.step)
    # Static choice (no lax.cond: XLA on GPU reads a cond's predicate back on the host, which made
    # every dispatch wait for the step before it). Without top-k/top-p no sort is needed.
    return sample(*args) if filtered else sample_unfiltered(*args)


def _step_entry(params, spec: PagedSpec, pool, slot_state, buffers, layout, filtered: bool = False):
    batch = unpack_batch(buffers, layout)
    return _tensor_parallel(partial(_step, spec=spec, filtered=filtered), spec, params, pool, slot_state, batch,
                            outputs=3)


_STEP_JIT = dict(static_argnames=("spec", "layout", "filtered"), donate_argnames=("pool", "slot_state"))
# From this many rows a step's matmuls go to cuBLAS rather than XLA's Triton GEMMs: on the H200, over
# fused projections, Triton was faster at 1 row, even at 32, cuBLAS faster from 64 (benchmarks/gemm.py)
CUBLAS_FROM_ROWS = 64
# XLA on GPU runs a step as CUDA graphs (command buffers); on the H200 their update and launch were most of
# a small-batch step's host time, and compiling without them (eager) cost more host time still
# (benchmarks/RESULTS.md, benchmarks/dispatch.py)
_NO_GRAPHS = {"xla_gpu_enable_command_buffer": ""}
# Programmatic dependent launch (Hopper and later; ignored elsewhere): each of XLA's kernels is launched
# while the one before it drains and waits for its data inside, so launch latency and the tail of one
# kernel overlap the start of the next. Off by default in jax 0.11's XLA; on the H200 it took 7% off a
# batch-1 bf16 Llama-7B step and 11% off an FP8 one (benchmarks/xla_modes.py, RESULTS.md)
# Experimental, off by default: the step's CUDA graph with its nodes ordered by their data alone (XLA's
# CONCURRENT command-buffer scheduling), so kernels that do not depend on each other (a layer's LoRA shrink
# beside its base projection) may run side by side. On the H200 S1 ran 3% faster with it, but
# benchmarks/step_parity.py gave other greedy tokens than the default order from the first token on (22 of
# 24 requests). A rounding-only change (the fused add and RMSNorm) moves tokens as much, and the order is
# equal to itself run to run, so it looks like rounding, not a race (benchmarks/RESULTS.md, thirtieth and
# thirty-sixth sessions); the gain is within run-to-run spread, so it stays off
_CONCURRENT_GRAPHS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
# XLA's rematerialization pass recomputes values to bring a program under a memory limit: 80% of the device's
# memory, less the program's inputs and outputs, times xla_gpu_memory_limit_slop_factor / 100. The step's
# donated pool (~90% of the memory) leaves that limit out of reach (it logs "Can't reduce memory use below
# 59 GiB ... only reduced to 150 GiB" for every step it compiles), and the pass clones GEMMs while it tries: an
# H100 process that compiled Llama-3-8B's steps for batches 1, 32 and 256 ran ~190 GEMM launches a batch-32
# step against ~126 (four a layer and the logits) in one that compiled 1 and 32, 7.77 against 6.38 ms
# (benchmarks/RESULTS.md, forty-fourth session). Without the pass the same process ran 129 launches, 6.39 ms
# (1.23x the floor), with the same tokens (forty-fifth session), so the step leaves it out by default
_NO_REMATERIALIZATION = {"xla_disable_hlo_passes": "rematerialization"}


@cache
def _compiled_step(cublas: bool, eager: bool, pdl: bool, concurrent: bool, rematerialization: bool):
    return jax.jit(_step_entry, **_STEP_JIT, compiler_options={
        **({"xla_gpu_enable_triton_gemm": False} if cublas else {}), **(_NO_GRAPHS if eager else {}),
        **(_CONCURRENT_GRAPHS if concurrent and not eager else {}), "xla_gpu_enable_pdl": pdl,
        **({} if rematerialization else _NO_REMATERIALIZATION)})


def step(params, spec: PagedSpec, pool, slot_state, batch, filtered: bool = False):
    """One engine step over a StepBatch (jslora.engine.batch), jitted: decode rows and prompt chunks
    together, so the weights are read once. slot_state (init_slot_state) is per batch slot: the last
    sampled token, so the host can launch this step before it has read the previous one's tokens, and
    the token counts penalties read. filtered: some sampled row uses top-k, top-p or logprobs (the variant
    that sorts the vocabulary). pool and slot_state are donated. Returns (pool, slot_state, the sampled
    tokens [R], (their logprobs [R], top ids [R, K], top logprobs [R, K]); zeros unless filtered, and
    every row's last hidden state [N, H] (prompt logprobs: row_logprobs)). The batch's NumPy leaves
    travel to the device as two buffers (jslora.model.packing)."""
    buffers, layout = pack_batch(batch)
    jitted = jitted_step(batch.tokens.shape[0], spec.eager, spec.pdl, spec.concurrent_graphs, spec.rematerialization)
    return jitted(params, spec, pool, slot_state, buffers, layout, filtered=filtered)


def init_slot_state(max_batch: int, vocab_size: int, sharding=None) -> dict:
    """Per batch slot (and a scratch slot max_batch for padding rows): the token sampled last, how often
    each token was generated (int32 [max_batch + 1, V]) and which were seen in the prompt (int8)."""
    return {"tokens": jnp.zeros((max_batch,), jnp.int32, device=sharding),
            "counts": jnp.zeros((max_batch + 1, vocab_size), jnp.int32, device=sharding),
            "seen": jnp.zeros((max_batch + 1, vocab_size), jnp.int8, device=sharding)}


def jitted_step(num_rows: int, eager: bool = False, pdl: bool = True, concurrent_graphs: bool = False,
                rematerialization: bool = False):
    """The jitted step function for batches of num_rows rows (for `.lower(...)` in tests; it takes the
    batch packed: `*pack_batch(batch)`); eager: compiled without CUDA graphs (PagedSpec.eager); pdl:
    with programmatic dependent launch (PagedSpec.pdl); concurrent_graphs, rematerialization: PagedSpec's."""
    return _compiled_step(num_rows >= CUBLAS_FROM_ROWS, eager, pdl, concurrent_graphs, rematerialization)


def _attention(spec: PagedSpec, batch):
    """attention(q [N, Hq, D], pool, layer) for the step's rows: the decode kernel on the first R rows,
    the prefill kernel on the chunks' tiles, each row taking its own part's result."""
    opts = dict(num_pages=spec.num_pages, interpret=spec.interpret, kv_fp8=spec.kv_fp8)
    dec, pre = batch.decode, batch.prefill
    r_rows = dec.lens.shape[0]
    dec_k, dec_v = token_pages(dec.k_blocks, spec.kv_block), token_pages(dec.v_blocks, spec.kv_block)
    # the decode kernel's merge counters, passed from layer to layer (the layers are traced in order, one
    # Python loop): each call leaves them zeroed for the next, so a step zeroes them once, not once a layer
    counters = None

    def decode(q, pool, layer):
        nonlocal counters
        out, counters = spec.backend.decode_attention(q, pool, layer, dec.lens, dec_k, dec_v, counters=counters,
                                                      **opts)
        return out

    if pre is None:
        return decode
    pre_k, pre_v = token_pages(pre.k_blocks, spec.kv_block), token_pages(pre.v_blocks, spec.kv_block)

    def attention(q, pool, layer):
        out = spec.backend.prefill_attention(q, pool, layer, batch.positions, pre.tile_seq, pre.tile_pos,
                                             pre.seq_lens, pre_k, pre_v, tile=PREFILL_TILE, **opts)
        head = decode(q[:r_rows], pool, layer)
        return out.at[:r_rows].set(jnp.where((dec.lens > 0)[:, None, None], head, out[:r_rows]))

    return attention


def _step_logits(params, pool, slot_state, batch, *, spec: PagedSpec):
    slot_tokens = slot_state["tokens"]
    max_batch = slot_tokens.shape[0]
    from_device = slot_tokens.at[batch.token_slot].get(mode="fill", fill_value=0)
    tokens = jnp.where(batch.token_slot < max_batch, from_device, batch.tokens)
    hidden, pool = _forward(params, spec, pool, tokens, batch, _attention(spec, batch))
    return pool, slot_state, logits_from_hidden(params, spec.cfg, hidden[batch.sample_rows]), hidden


def _record_chunks(slot_state, batch):
    """The penalties' per-slot token state after this step's prompt chunks: a request's first chunk
    empties its slot's state; prompt tokens are marked seen, recomputed generated tokens counted."""
    pre = batch.prefill
    counts = slot_state["counts"].at[pre.reset_slot].set(0)
    seen = slot_state["seen"].at[pre.reset_slot].set(0)
    counts = counts.at[pre.mark_slot, batch.tokens].add(pre.mark_generated.astype(counts.dtype))
    seen = seen.at[pre.mark_slot, batch.tokens].max((~pre.mark_generated).astype(seen.dtype))
    return {**slot_state, "counts": counts, "seen": seen}


def _step(params, pool, slot_state, batch, *, spec: PagedSpec, filtered: bool):
    pool, slot_state, logits, hidden = _step_logits(params, pool, slot_state, batch, spec=spec)
    if batch.prefill is not None:
        slot_state = _record_chunks(slot_state, batch)
    sp, slots = batch.sampling, batch.sample_slot  # padding rows use the scratch slot max_batch
    counts, seen = slot_state["counts"], slot_state["seen"]
    processed = process_logits(logits, counts[slots], seen[slots] > 0, sp.presence, sp.frequency, sp.repetition,
                               sp.bias_ids, sp.bias_values)
    new_tokens = _sample(processed, sp, filtered)
    if filtered:  # the variant that sorts anyway also reports logprobs (of the model's raw distribution)
        logprobs = top_logprobs(logits, new_tokens, MAX_LOGPROBS)
    else:
        rows = new_tokens.shape[0]
        logprobs = (jnp.zeros(rows), jnp.zeros((rows, MAX_LOGPROBS), jnp.int32), jnp.zeros((rows, MAX_LOGPROBS)))
    slot_state = {"tokens": slot_state["tokens"].at[slots].set(new_tokens, mode="drop"),
                  "counts": counts.at[slots, new_tokens].add(1), "seen": seen}
    return pool, slot_state, new_tokens, logprobs, hidden


@partial(jax.jit, static_argnames=("cfg",))
def row_logprobs(params, cfg: ModelConfig, hidden, rows, tokens):
    """Logprobs of given tokens at given rows of a step's hidden states [N, H] (prompt logprobs: a
    prompt row's logits against the prompt's next token): rows, tokens [M] -> (logprobs [M], top ids
    [M, K], top logprobs [M, K]) of the raw distribution. Padding rows may repeat any row."""
    return top_logprobs(logits_from_hidden(params, cfg, hidden[rows]), tokens, MAX_LOGPROBS)


@partial(jax.jit, static_argnames=("spec",))
def step_logits(params, spec: PagedSpec, pool, slot_state, batch):
    """The step's logits [R, vocab] (float32) of its sampled rows instead of tokens; nothing donated (for
    tests and debugging: the tensor-parallel step is checked against one device with it)."""
    return _tensor_parallel(partial(_step_logits, spec=spec), spec, params, pool, slot_state, batch, outputs=2)[2]


# Copy an adapter's rows [L, n, W] onto its pages [n] in every layer, in place (pool donated).
# Padding entries point at the null page with zero rows, so they leave it zero.
write_adapter_pages = jax.jit(write_pages, static_argnames=("layout",), donate_argnames=("pool",))
