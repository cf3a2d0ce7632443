"""Decode steps of the whole engine on the GPU (issue: engine), Llama-7B shapes, dummy weights.

    PYTHONPATH=. python benchmarks/engine.py                 # H100: writes $OUT/engine.json
    PYTHONPATH=. python benchmarks/engine.py --quick         # CPU smoke run on the tiny model

For each number of distinct adapters (0 = no LoRA in the step at all) and batch size B: B requests
(prompt --prompt tokens, greedy, EOS ignored) are prefilled, then --steps engine steps are timed in
steady state: wall time per `engine.step()` (scheduling, metadata, dispatch, token readback, with the
host one step ahead of the device), the host's own time per step, and the device time of the same
decode step replayed back to back with fixed metadata (no host work). GPU idle share = 1 - device /
wall. The floor is max(bytes a decode step must read (weights, the batch's KV, each distinct adapter once)
/ the best device copy rate measured in this run, its flops / the measured bf16 matmul rate).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, rooflines, write_json
from jslora import compilation_cache
from jslora.bench.cli import top_functions
from jslora.bench.hlo_sources import kernels_by_source, module_sources
from jslora.bench.reference import drain, fill_batch, step_times
from jslora.bench.timeline import gpu_kernels, kernel_seconds_by_op, op_name, seconds_by_kind, trace_events
from jslora.config import ModelConfig
from jslora.engine import Engine, EngineConfig
from jslora.engine.config import add_step_arguments, step_options
from jslora.loading.model import load_model
from jslora.loading.peft_adapter import dummy_adapter
from jslora.model.paged import step
from jslora.request import Chunk
from pallas_kernels import attention, decode_tiling

PROFILE_STEPS = 8  # engine steps traced for the per-op breakdown


def weight_bytes(params: dict, cfg: ModelConfig) -> int:
    """Bytes a decode step reads of the weights (the embedding is gathered, not read, unless tied)."""
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    return total - (0 if cfg.tie_word_embeddings else params["embed"].nbytes)


def device_step_seconds(engine: Engine, requests, reps: int, chunk_tokens: int = 0, decode: bool = True) -> float:
    """One step replayed with fixed metadata (pool and tokens fed back): the requests' decode rows
    (decode=True) and, with chunk_tokens, a prompt chunk that recomputes the first chunk_tokens
    positions of the first request (same work as a new prompt's chunk; it rewrites identical KV)."""
    # a request whose next token starts a KV block not yet allocated replays its last position instead
    # (same work; the requests are aborted after)
    computed = [r.num_computed for r in requests]
    for r in requests:
        r.num_computed = min(r.num_computed, len(r.k_blocks) * engine.config.kv_block - 1)
    runner = engine.runner
    chunks = [Chunk(requests[0], 0, min(chunk_tokens, requests[0].num_computed))] if chunk_tokens else []
    # NumPy metadata, as the engine passes it: two small host-to-device copies a call (jslora.model.packing),
    # queued behind the running step
    meta = runner.step_batch(requests if decode else [], chunks, engine.residency)
    for r, n in zip(requests, computed):
        r.num_computed = n
    pool, slot_state = runner.pool, runner.slot_state
    for _ in range(3):
        pool, slot_state, out, _, _ = step(runner.params, runner.spec, pool, slot_state, meta)
    out.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        pool, slot_state, out, _, _ = step(runner.params, runner.spec, pool, slot_state, meta)
    out.block_until_ready()
    runner.pool, runner.slot_state = pool, slot_state
    return (time.perf_counter() - t0) / reps


def attention_alone(engine: Engine, requests) -> dict:
    """The decode attention kernel of one layer called alone, outside the step, over the engine's own pool,
    page tables and lengths (a random q): device µs a call, each call from HBM (flush_l2) and back to back.
    Set beside the step's profile, it tells a slower kernel inside the step (clocks, the step's other work)
    from a slower problem (the engine's page layout, ragged lengths) than benchmarks/attention.py times."""
    from benchmarks.lora_tune import device_us
    from jslora.model.paged import token_pages

    runner, cfg = engine.runner, engine.model_config
    meta = runner.step_batch(requests, [], engine.residency).decode
    lens = jnp.asarray(meta.lens)
    k_pages, v_pages = (token_pages(jnp.asarray(b), runner.spec.kv_block) for b in (meta.k_blocks, meta.v_blocks))
    q = jax.random.normal(jax.random.PRNGKey(0), (lens.shape[0], cfg.num_heads, cfg.head_dim), runner.dtype)
    call = jax.jit(lambda q, pool, lens, k, v: attention.paged_decode_attention(
        q, pool, cfg.num_layers // 2, lens, k, v, num_pages=runner.spec.num_pages, kv_fp8=runner.spec.kv_fp8,
        interpret=runner.spec.interpret))
    args = (q, runner.pool, lens, k_pages, v_pages)
    return {"rows": int(lens.shape[0]), "table_tokens": int(k_pages.shape[1]),
            "lens_mean": float(np.mean(meta.lens[meta.lens > 0])), "lens_max": int(meta.lens.max()),
            "flushed_us": sum(device_us(call, *args, flush_l2=jax.default_backend() == "gpu").values()),
            "back_to_back_us": sum(device_us(call, *args).values())}


def device_time_by_op(trace_dir: str, steps: int, top: int = 40) -> tuple[dict, dict, list, dict]:
    """Device time per step by kernel name (ms), from the perfetto trace jax.profiler wrote: see
    kernel_breakdown."""
    return kernel_breakdown(gpu_kernels(*trace_events(trace_dir)), steps, top)


def kernel_breakdown(kernels: list, steps: int, top: int = 40) -> tuple[dict, dict, list, dict]:
    """A trace's kernels (gpu_kernels) per step: the ops of one step summed over its layers (ms), largest
    first; the same by kind; the kernels by op and duration (rounded to 0.5 us): [op, us, launches a
    step, ms a step], largest first, which tells one layer's GEMMs apart (q,k,v / o / gate,up / down all run
    as gemm_fusion_dot) where two processes' steps differ; and launches a step by kind (GEMMs cloned by XLA's
    rematerialization pass show as more than a layer's four and the logits: RESULTS.md, forty-fourth
    session)."""
    totals = kernel_seconds_by_op(kernels)
    by_duration = collections.Counter()
    launches = collections.Counter()
    for e in kernels:
        key = (op_name(e), round(e["dur"] * 2) / 2)
        by_duration[key] += e["dur"] / 1e3
        launches[key] += 1
    histogram = [[name, us, launches[(name, us)] / steps, ms / steps]
                 for (name, us), ms in by_duration.most_common(top)]
    launches_by_kind = seconds_by_kind(collections.Counter(op_name(e) for e in kernels))
    return {name: s * 1e3 / steps for name, s in totals.most_common(top)}, \
        {kind: s * 1e3 / steps for kind, s in seconds_by_kind(totals).items()}, histogram, \
        {kind: n / steps for kind, n in launches_by_kind.items()}


def measure(engine: Engine, batch: int, adapters: list[str | None], args, rng) -> dict:
    cfg = engine.model_config
    prompts = [rng.integers(3, cfg.vocab_size, args.prompt).tolist() for _ in range(batch)]
    # as long as the model allows, so no request finishes before the last measured step: filling the batch
    # can take far more steps than its prefill tokens need (with 256 adapters, twice failed on the H200 at
    # a tighter limit); KV pages are allocated as tokens come, so the limit itself costs nothing
    steps0 = engine.stats.steps
    requests, prefill_s = fill_batch(engine, prompts, adapters, engine.max_model_len - args.prompt - 1)
    fill_steps = engine.stats.steps - steps0
    host0, steps0 = engine.stats.host_seconds, engine.stats.steps
    profile = cProfile.Profile() if args.host_profile else None
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    step_ms = step_times(engine, args.steps) * 1e3  # per step: is idle time spread evenly or in a few stalls?
    if profile is not None:
        profile.disable()
    jax.block_until_ready(engine.runner.pool)
    wall = (time.perf_counter() - t0) / args.steps
    breakdown = kinds = histogram = by_source = launches = None
    if batch in args.profile_batches:  # steps traced: where does the time go?
        out = os.path.join(os.environ.get("OUT", "."), f"profile_b{batch}_a{len(set(adapters) - {None})}")
        jax.profiler.start_trace(out, create_perfetto_trace=True)
        for _ in range(PROFILE_STEPS):
            engine.step()
        jax.block_until_ready(engine.runner.pool)
        jax.profiler.stop_trace()
        kernels = gpu_kernels(*trace_events(out))  # the trace read once
        breakdown, kinds, histogram, launches = kernel_breakdown(kernels, steps=PROFILE_STEPS)
        if args.hlo_dump:  # the small kernels' JAX source lines, from the step's optimized HLO
            sources = module_sources(args.hlo_dump, {e.get("name") for e in kernels}, module="step_entry")
            by_source = kernels_by_source(kernels, sources, PROFILE_STEPS)
    host = (engine.stats.host_seconds - host0) / (engine.stats.steps - steps0)
    preempted = sum(r.num_preemptions for r in requests)
    running = [r for r in requests if r.batch_slot is not None]
    finished = sum(r.finish_time is not None for r in requests)
    assert len(running) == batch, (f"only {len(running)} of {batch} requests still running ({finished} finished, "
                                   f"{preempted} preemptions, batch filled in {fill_steps} steps)")
    context = float(np.mean([r.num_computed for r in running]))
    device = device_step_seconds(engine, running, args.steps)
    alone = {"attention_alone": attention_alone(engine, running)} if args.attention_alone else {}
    mixed = {}
    if args.chunk and adapters == [None]:  # one launch vs two: decode rows + a prompt chunk
        chunk = min(args.chunk, running[0].num_computed)
        launched = engine.runner.launched_rows(batch, [Chunk(running[0], 0, chunk)])
        mixed = {"chunk_tokens": chunk, "mixed_rows_launched": launched,
                 "mixed_ms": device_step_seconds(engine, running, args.steps, chunk) * 1e3,
                 "chunk_alone_ms": device_step_seconds(engine, running, args.steps, chunk, decode=False) * 1e3}
        mixed["one_launch_saves_ms"] = device * 1e3 + mixed["chunk_alone_ms"] - mixed["mixed_ms"]
    drain(engine, requests)

    distinct = {a for a in adapters[:batch] if a is not None}
    kv_value_bytes = 1 if engine.config.kv_cache_dtype == "fp8" else engine.runner.dtype.itemsize
    kv_bytes = batch * (context + 1) * cfg.num_layers * 2 * cfg.kv_width * kv_value_bytes
    adapter_bytes = sum(engine.store.get(a).num_pages for a in distinct) * cfg.num_layers * cfg.kv_width \
        * engine.runner.dtype.itemsize
    bytes_read = engine.weight_bytes + kv_bytes + adapter_bytes
    # every weight multiplies every row; attention's two products over the context
    flops = 2 * engine.weight_bytes / engine.runner.dtype.itemsize * batch \
        + 4 * batch * (context + 1) * cfg.num_heads * cfg.head_dim * cfg.num_layers
    floor = max(bytes_read / args.hbm, flops / args.matmul)
    return {"batch": batch, "distinct_adapters": len(distinct), "device_ms_by_op": breakdown,
            "device_ms_by_kind": kinds, "launches_by_kind": launches, "kernels_by_duration": histogram,
            "other_kernels_by_source": by_source,
            "lora_in_step": bool(engine.runner.targets),
            "context": context, "wall_ms": wall * 1e3, "device_ms": device * 1e3, "host_ms": host * 1e3,
            "gpu_idle_share": max(0.0, 1 - device / wall), "tokens_per_s": batch / wall,
            "floor_ms": floor * 1e3, "wall_over_floor": wall / floor, "device_over_floor": device / floor,
            "step_ms_p50": float(np.median(step_ms)), "step_ms_p90": float(np.percentile(step_ms, 90)),
            "step_ms_max": float(step_ms.max()), "bytes_read_gb": bytes_read / 1e9, "tflop": flops / 1e12,
            "floor_from": "bytes" if bytes_read / args.hbm >= flops / args.matmul else "flops",
            "prefill_s": prefill_s, "fill_steps": fill_steps, "preemptions": preempted, **mixed, **alone,
            **({"host_profile": top_functions(profile, 25)} if profile is not None else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--adapters", default="0,1,8,256", help="distinct adapters per batch; 0 = no LoRA")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--profile-batch", default="",
                    help="batch sizes (comma-separated) whose no-LoRA steps are profiled: device ms per op")
    ap.add_argument("--chunk", type=int, default=0,
                    help="also time the no-LoRA step with a prompt chunk of this many tokens, and the chunk alone")
    ap.add_argument("--quantization", default=None, help="fp8: FP8 base weights (the floor reads their bytes)")
    ap.add_argument("--attention-combine", choices=("auto", "xla", "kernel"), default=None,
                    help="where decode attention's split contexts merge (decode_tiling.DECODE_COMBINE)")
    ap.add_argument("--attention-min-split-keys", type=int, default=None,
                    help="the fewest keys a split of a decode context holds (decode_tiling.MIN_SPLIT_KEYS)")
    ap.add_argument("--attention-prefetch", choices=("gqa", "always", "never"), default=None,
                    help="where decode attention reads page ids a step ahead (decode_tiling.PREFETCH_PAGES)")
    ap.add_argument("--attention-mask-padding", choices=("on", "off"), default=None,
                    help="decode attention's gathers masked past each length (decode_tiling.MASK_PADDING)")
    ap.add_argument("--attention-pack-heads", choices=("on", "off"), default=None,
                    help="a decode program's KV heads in one query tile (decode_tiling.PACK_HEADS)")
    ap.add_argument("--attention-single-pipeline", choices=("on", "off"), default=None,
                    help="batch-1 GQA decode at 2 warps, page ids ahead "
                         "(decode_tiling.SINGLE_SEQUENCE_PIPELINE)")
    ap.add_argument("--attention-alone", action="store_true",
                    help="also time one layer's decode attention kernel alone over the engine's pool and tables")
    add_step_arguments(ap)
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the timed steps: the host's heaviest functions per row (in the JSON and printed)")
    ap.add_argument("--num-pages", type=int, default=None,
                    help="the pool's pages (default: what fits the GPU; runs compared under other allocators, "
                         "which may report no memory budget, need the same number)")
    ap.add_argument("--quick", action="store_true", help="tiny model, small batches (CPU smoke run)")
    ap.add_argument("--skip-warmup", action="store_true", help="compile only the shapes the run uses")
    compilation_cache.add_argument(ap)  # with it XLA's per-fusion autotune results: GEMM choices kept across runs
    ap.add_argument("--hlo-sources", action="store_true",
                    help="profiled batches: each small kernel (not a GEMM, LoRA or attention) with the JAX source "
                         "lines it was compiled from (XLA dumps the optimized step; no compilation cache)")
    args = ap.parse_args()
    args.hlo_dump = None
    if args.hlo_sources:  # before JAX starts its backend, which reads XLA_FLAGS once
        args.hlo_dump, args.compilation_cache_dir = tempfile.mkdtemp(prefix="hlo_"), ""
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.hlo_dump} "
                                   "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_entry.*").strip()
    compilation_cache.enable(args.compilation_cache_dir)
    if args.attention_combine:
        decode_tiling.DECODE_COMBINE = args.attention_combine  # read when the step is traced
    if args.attention_min_split_keys is not None:
        decode_tiling.MIN_SPLIT_KEYS = args.attention_min_split_keys
    if args.attention_prefetch:
        decode_tiling.PREFETCH_PAGES = args.attention_prefetch
    if args.attention_mask_padding:
        decode_tiling.MASK_PADDING = args.attention_mask_padding == "on"
    if args.attention_pack_heads:
        decode_tiling.PACK_HEADS = args.attention_pack_heads == "on"
    if args.attention_single_pipeline:
        decode_tiling.SINGLE_SEQUENCE_PIPELINE = args.attention_single_pipeline == "on"
    if args.quick:
        args.model, args.batches, args.adapters, args.prompt, args.steps = "tiny", "1,4", "0,1,3", 20, 4
        args.chunk = args.chunk or 16
    batches = [int(b) for b in args.batches.split(",")]
    args.profile_batches = {int(b) for b in args.profile_batch.split(",") if b}
    counts = [int(n) for n in args.adapters.split(",")]
    targets = tuple(args.targets.split(","))
    cfg = ModelConfig.named(args.model)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    roof = rooflines() if on_gpu else {"hbm_bytes_per_s": 1e11, "matmul_flops_per_s": 1e12}
    args.hbm, args.matmul = roof["hbm_bytes_per_s"], roof["matmul_flops_per_s"]
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    params = load_model(f"dummy:{args.model}", dtype).params
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    max_model_len = max(2048, args.prompt + args.steps + 64) if on_gpu else 256
    config = EngineConfig(max_batch=max(batches), max_model_len=max_model_len,
                          max_num_batched_tokens=4096 if on_gpu else 128, max_lora_rank=max(16, args.rank),
                          max_adapters=max(counts) + 8, num_pages=args.num_pages or (None if on_gpu else 4096),
                          quantization=args.quantization,
                          **step_options(args))
    engine = Engine(params, cfg, dtype, config)
    gc.collect()
    gc.freeze()  # as a server does after start-up: long-lived objects out of the collector's full passes
    engine.weight_bytes = weight_bytes(params, cfg)
    rows, compile_s = [], {}
    for n in counts:
        if n == 0:  # no LoRA in the step at all (compiled on first use)
            names = [None]
        else:
            if not engine.store.names():  # one random adapter's weights, registered under many names
                base = dummy_adapter(cfg, args.rank, targets, seed=1)
                t1 = time.perf_counter()
                for i in range(max(counts)):
                    engine.register_adapter(f"a{i}", base)
                register_s = (time.perf_counter() - t1) / max(counts)
                engine.step()  # apply the registrations: the step now computes LoRA on `targets`
                if not args.skip_warmup:
                    compile_s["lora_all_shapes"] = engine.warmup()  # what a server does at start-up
            names = [f"a{i}" for i in range(n)]
        if n > 0 and n > max(batches):
            continue
        for batch in batches:
            if n > batch:
                continue
            row = measure(engine, batch, names, args, rng)
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    payload = {"env": environment(), "roofline": roof, "decode_lora_tile": args.decode_lora_tile, "model": args.model,
               "quantization": args.quantization, "fp8_gemm": args.fp8_gemm, "enforce_eager": args.enforce_eager,
               "pdl": args.pdl, "xla_rematerialization": args.xla_rematerialization, "fused_rope": args.fused_rope,
               "fused_norm": args.fused_norm, "kv_cache_dtype": args.kv_cache_dtype,
               "attention_combine": decode_tiling.DECODE_COMBINE,
               "attention_min_split_keys": decode_tiling.MIN_SPLIT_KEYS,
               "attention_prefetch": decode_tiling.PREFETCH_PAGES,
               "attention_mask_padding": decode_tiling.MASK_PADDING, "attention_pack_heads": decode_tiling.PACK_HEADS,
               "attention_single_pipeline": decode_tiling.SINGLE_SEQUENCE_PIPELINE,
               "weight_bytes": engine.weight_bytes, "decode_buckets": engine.runner.decode_buckets,
               "step_buckets": engine.runner.step_buckets, "rank": args.rank, "targets": targets,
               "prompt": args.prompt, "steps": args.steps, "weights_load_s": load_s, "compile_s": compile_s,
               "register_s_per_adapter": locals().get("register_s"), "pool_pages": engine.layout.num_pages,
               "rows": rows}
    path = write_json("engine.json", payload)
    if args.hlo_dump:  # every compiled module's HLO and IR: hundreds of MB
        shutil.rmtree(args.hlo_dump, ignore_errors=True)
    no_lora = {r["batch"]: r for r in rows if not r["lora_in_step"]}
    print(f"\nroofline {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s; compile {compile_s}; "
          f"pool {engine.layout.num_pages} pages")
    print(f"{'adapters':>8} {'batch':>5} {'wall ms':>8} {'dev ms':>7} {'host ms':>7} {'idle':>5} {'tok/s':>8} "
          f"{'p50 ms':>7} {'max ms':>7} {'floor ms':>8} {'dev/floor':>9} {'wall/floor':>10} {'vs noLoRA':>9}")
    for r in rows:
        base = no_lora.get(r["batch"])
        ratio = r["wall_ms"] / base["wall_ms"] if base and r["lora_in_step"] else float("nan")
        label = r["distinct_adapters"] if r["lora_in_step"] else "none"
        print(f"{label:>8} {r['batch']:>5} {r['wall_ms']:8.2f} {r['device_ms']:7.2f} {r['host_ms']:7.2f} "
              f"{r['gpu_idle_share']:5.2f} {r['tokens_per_s']:8.0f} {r['step_ms_p50']:7.2f} {r['step_ms_max']:7.2f} "
              f"{r['floor_ms']:8.2f} {r['device_over_floor']:9.2f} {r['wall_over_floor']:10.2f} "
              f"{ratio:9.3f}")
    for r in rows:
        if "mixed_ms" in r:
            print(f"batch {r['batch']}: decode {r['device_ms']:.2f} ms + chunk of {r['chunk_tokens']} alone "
                  f"{r['chunk_alone_ms']:.2f} ms vs one step with both {r['mixed_ms']:.2f} ms "
                  f"({r['mixed_rows_launched']} rows launched; one launch saves {r['one_launch_saves_ms']:.2f} ms)")
    for r in rows:
        if r.get("host_profile"):
            label = r["distinct_adapters"] if r["lora_in_step"] else "no LoRA"
            print(f"\nhost ms per step by function (own time), batch {r['batch']}, {label}:")
            for name, _calls, own, cumulative in r["host_profile"]["own"][:12]:
                print(f"  {own / args.steps * 1e3:7.3f} own {cumulative / args.steps * 1e3:7.3f} cum  {name[-90:]}")
    for r in rows:
        if r.get("device_ms_by_op"):
            label = r["distinct_adapters"] if r["lora_in_step"] else "no LoRA"
            total = sum(r["device_ms_by_op"].values())
            print(f"\ndevice ms per step by op, batch {r['batch']}, {label} (sum {total:.2f}):")
            for name, ms in list(r["device_ms_by_op"].items())[:16]:
                print(f"  {ms:7.3f}  {name[:100]}")
            print("  kernels by duration: us x launches a step = ms a step")
            for name, us, count, ms in r["kernels_by_duration"][:12]:
                print(f"  {us:7.1f} x {count:5.1f} = {ms:7.3f}  {name[:80]}")
            if r.get("other_kernels_by_source"):
                print("  the other kernels' sources: us a step, launches a step, kernel, op @ source")
                for name, us, count, op, source, _fused in r["other_kernels_by_source"][:20]:
                    print(f"  {us:7.1f} {count:5.1f}  {name[:40]:40} {op[-50:]} @ {source[:70]}")
    profiled = [r for r in rows if r.get("device_ms_by_kind")]
    if profiled:
        kinds = list(profiled[0]["device_ms_by_kind"])
        print(f"\n{'adapters':>8} {'batch':>5} " + " ".join(f"{k + ' ms':>11}" for k in kinds)
              + " " + " ".join(f"{k + ' launches':>18}" for k in kinds))
        for r in profiled:
            label = r["distinct_adapters"] if r["lora_in_step"] else "none"
            print(f"{label:>8} {r['batch']:>5} " + " ".join(f"{r['device_ms_by_kind'][k]:11.3f}" for k in kinds)
                  + " " + " ".join(f"{r['launches_by_kind'][k]:18.1f}" for k in kinds))
    for r in rows:
        if r.get("attention_alone"):
            alone = r["attention_alone"]
            by_op = r.get("device_ms_by_op") or {}
            in_step = by_op.get("paged_decode_attention", float("nan")) * 1e3 / cfg.num_layers
            print(f"batch {r['batch']}: decode attention a call: {in_step:.1f} µs in the step (profile), alone "
                  f"{alone['flushed_us']:.1f} from HBM, {alone['back_to_back_us']:.1f} back to back "
                  f"(lengths mean {alone['lens_mean']:.0f}, max {alone['lens_max']}, table {alone['table_tokens']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
