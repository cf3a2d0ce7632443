"""Paged decode attention against the GPU's roofline and two anchors, in one run (issue: decode at the
physical limit).

    PYTHONPATH=. python benchmarks/attention.py            # GPU: writes $OUT/attention.json
    PYTHONPATH=. python benchmarks/attention.py --quick    # CPU smoke run (interpret mode, tiny shapes)

For each (batch, context, query heads / KV heads): ours at its default tiling and at a few others
(best kept), JAX's own `jax.experimental.pallas.ops.gpu.paged_attention` at its best
pages_per_compute_block / k_splits, and torch's scaled_dot_product_attention over the same keys laid
out dense (the upper bound). Bytes = K and V of every key once + q + out; share = bytes / time / the
best copy rate measured in this run. Problems whose bytes fit in L2 rotate over several page sets, so
no kernel is timed from cache.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import BF16, environment, rooflines, timed, write_json
from benchmarks.lora_tune import kernel_split
from pallas_kernels.attention import (
    decode_counters,
    paged_attention_reference,
    paged_decode_attention,
    paged_decode_attention_counted,
)
from pallas_kernels.decode_tiling import decode_launch_params
from pallas_kernels.kv_fp8 import pack_rows

SHAPES = [(256, 160, 32, 32), (64, 1024, 32, 32), (256, 160, 32, 8), (64, 1024, 32, 8), (1, 4096, 32, 8),
          (8, 4096, 32, 8)]
HEAD_DIM = 128
MIN_BYTES = 512 << 20  # rotate over page sets until a pass reads at least this much (L2 is 50 MB)


def problem(key, batch, context, kv_heads, rotations, kv_fp8=False, pool_pages=0, block=1):
    """A pool holding `rotations` disjoint copies of the batch's K/V pages in random order, spread over
    `pool_pages` rows if more (a layer's share of the engine's pool: 418,832 pages for Llama-7B on the H200).
    kv_fp8: a token's FP8 key and value packed into one page (pallas_kernels.kv_fp8), as the engine's FP8 cache
    lays them. block: a sequence's tokens on runs of this many consecutive pages (the engine's kv_block), the
    runs in random order (1: every page anywhere)."""
    width = kv_heads * HEAD_DIM
    tokens = batch * context
    pages_per_token = 1 if kv_fp8 else 2
    used = pages_per_token * tokens * rotations
    num_pages = max(1 + used, pool_pages)
    pool = jax.random.normal(key, (num_pages, width), BF16)
    if kv_fp8:  # a key row and a value row of `width` values each, packed into the row's two halves
        values = jax.random.normal(jax.random.fold_in(key, 1), (num_pages, width), BF16)
        pool = jnp.concatenate([pack_rows(pool, BF16), pack_rows(values, BF16)], 1)
    assert pool.shape == (num_pages, width)
    assert context % block == 0, "the context must be whole blocks"
    runs = np.random.default_rng(0).permutation((num_pages - 1) // block)[:used // block]
    order = (1 + runs[:, None] * block + np.arange(block)[None, :]).astype(np.int32)
    tables = order.reshape(rotations, pages_per_token, batch, context)
    return pool, jnp.asarray(tables[:, 0]), jnp.asarray(tables[:, -1]), num_pages


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.isfinite(a).all() else float("inf")


def counted_call(q, pool, lens, k_pages, v_pages, counters, num_pages, fresh_counters=False, **tiling):
    """(out, counters) of one call, the merge counters handed on from the call before as a step's layers hand
    them (zeroed once); fresh_counters: the call zeroes its own (a pass of its own, as before the forty-first
    session) and the given ones pass through."""
    out, returned = paged_decode_attention_counted(q, pool, jnp.int32(0), lens, k_pages, v_pages,
                                                   None if fresh_counters else counters, num_pages=num_pages, **tiling)
    return out, counters if fresh_counters or returned is None else returned


def time_ours(q, pool, lens, k_all, v_all, num_pages, **tiling):
    """Seconds a call (counted_call's counters)."""
    rotations = k_all.shape[0]

    def step(carry, pool, lens, k_all, v_all):
        out, i, counters = carry
        r = i % rotations
        out, counters = counted_call(out, pool, lens, k_all[r], v_all[r], counters, num_pages, **tiling)
        return out, i + 1, counters

    counters = decode_counters(q.shape[0], pool.shape[1] // HEAD_DIM)
    return timed(step, (q, jnp.int32(0), counters), pool, lens, k_all, v_all)


def device_kernels_us(q, pool, lens, k_pages, v_pages, num_pages, **tiling) -> dict:
    """Device µs a call by kernel, each call from HBM (L2 flushed; counted_call's counters)."""
    def call(carry, q, pool, lens, k_pages, v_pages):
        return counted_call(q, pool, lens, k_pages, v_pages, carry[1], num_pages, **tiling)

    carry = (jnp.zeros_like(q), decode_counters(q.shape[0], pool.shape[1] // HEAD_DIM))
    return kernel_split(call, carry, (q, pool, lens, k_pages, v_pages), flush_l2=True, donate_carry=True)


# the per-call times a row reports, each also as a share of the copy rate
COLUMNS = ("ours_default", "ours_best", "ours_default_device", "ours_best_device", "jax_pallas",
           "jax_pallas_device", "torch_sdpa", "torch_sdpa_graph")


def time_jax_pallas(q, pool, lens, k_all, v_all, kv_heads, page_size=16, on_gpu: bool = False):
    """JAX's kernel over the same keys in its layout: k_pages [Hkv, pages, page_size, D]. Returns (its best
    tiling's seconds a call in a timing loop, that tiling, its device µs a call by kernel from a profiler trace,
    each call from HBM, as ours: on a GPU the loop adds ~20 µs a call of its own)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    rotations, batch, context = k_all.shape

    def layout(tables):  # token pages -> one block of page_size tokens per JAX page, per rotation
        rows = pool[tables.reshape(-1)].reshape(-1, page_size, kv_heads, HEAD_DIM)
        return jnp.transpose(rows, (2, 0, 1, 3))  # [Hkv, rotations * batch * context / page_size, ...]

    k_pages, v_pages = layout(k_all), layout(v_all)
    pages_per_seq = context // page_size
    block_tables = jnp.arange(rotations * batch * pages_per_seq, dtype=jnp.int32).reshape(rotations, batch, -1)
    best = (float("inf"), None)
    for ppcb in (1, 2, 4, 8, 16):  # 1 and 2 for short contexts: context 160 holds 10 pages
        for k_splits in (1, 4, 16):
            if pages_per_seq % (ppcb * k_splits):
                continue
            opts = dict(pages_per_compute_block=ppcb, k_splits=k_splits)

            def step(carry, kp, vp, bt, lens):
                out, i = carry
                out = paged_attention(out, kp, vp, bt[i % rotations], lens, **opts).astype(out.dtype)
                return out, i + 1

            try:
                t = timed(step, (q, jnp.int32(0)), k_pages, v_pages, block_tables, lens)
            except Exception as e:  # noqa: BLE001 - report configurations that do not lower
                print(f"  jax paged_attention {opts}: {type(e).__name__}: {str(e)[:120]}")
                continue
            best = min(best, (t, opts), key=lambda x: x[0])
    if best[1] is None or not on_gpu:
        return (*best, {})

    def call(out, kp, vp, bt, lens):
        return paged_attention(out, kp, vp, bt, lens, **best[1]).astype(out.dtype)

    device = kernel_split(call, q, (k_pages, v_pages, block_tables[0], lens), flush_l2=True)
    return (*best, device)


def time_torch_sdpa(q, pool, k_all, v_all, kv_heads, group) -> tuple[float, float]:
    """torch SDPA over dense K/V [B, Hkv, ctx, D] (GQA through enable_gqa): the dense upper bound. Returns
    (a launch loop's seconds a call, a CUDA graph's replay's seconds a call). At batch 1 the loop measures
    Python's launches (24-35 µs on an H100 for a 10-µs kernel); the graph replays the same calls without them,
    the figure to set beside our kernels' device time."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return float("nan"), float("nan")
    if not torch.cuda.is_available():
        return float("nan"), float("nan")
    rotations, batch, context = k_all.shape

    def dense(tables):
        x = np.asarray(pool[tables.reshape(-1)].astype(jnp.float32))
        x = x.reshape(rotations, batch, context, kv_heads, HEAD_DIM)
        return torch.from_numpy(x).to("cuda", torch.bfloat16).permute(0, 1, 3, 2, 4).contiguous()

    ks, vs = dense(k_all), dense(v_all)
    qt = torch.from_numpy(np.asarray(q.astype(jnp.float32))).to("cuda", torch.bfloat16)[:, :, None, :]
    counter = [0]

    def run():
        r = counter[0] % rotations
        counter[0] += 1
        return F.scaled_dot_product_attention(qt, ks[r], vs[r], enable_gqa=group > 1)

    for _ in range(5):
        run()
    torch.cuda.synchronize()
    reps = 200

    def seconds_per_call(launch) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    loop = seconds_per_call(lambda: [run() for _ in range(reps)])
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()  # capture off the default stream, as torch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        outs = [run() for _ in range(reps)]  # noqa: F841 - kept alive for the graph's replays
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    replayed = seconds_per_call(graph.replay)
    del graph, outs
    torch.cuda.empty_cache()
    return loop, replayed


def bench(shape, roof, tilings, anchors: bool, table: int = 0, kv_fp8: bool = False, pool_pages: int = 0,
          block: int = 1):
    """table: our page tables' width (the engine's max_model_len), past the context (null pages); default
    the context. kv_fp8: an FP8 cache (one byte a key or value element; anchors over the bf16 values)."""
    batch, context, heads, kv_heads = shape
    table = max(table, context)
    group = heads // kv_heads
    kv_bytes = 1 if kv_fp8 else 2
    bytes_moved = batch * context * kv_heads * HEAD_DIM * 2 * kv_bytes + 2 * batch * heads * HEAD_DIM * 2
    rotations = max(1, -(-MIN_BYTES // bytes_moved)) if jax.default_backend() == "gpu" else 1
    pool, k_all, v_all, num_pages = problem(jax.random.PRNGKey(batch * context + kv_heads), batch, context, kv_heads,
                                            rotations, kv_fp8, pool_pages, block)
    q = jax.random.normal(jax.random.PRNGKey(7), (batch, heads, HEAD_DIM), BF16)
    lens = jnp.full((batch,), context, jnp.int32)
    ref = paged_attention_reference(q, pool, 0, lens - 1, jnp.arange(batch), k_all[0], v_all[0], num_pages=num_pages,
                                    kv_fp8=kv_fp8)
    default = {**decode_launch_params(batch, kv_heads, group, table), "kv_fp8": kv_fp8}
    # ours over tables as wide as the engine's: null pages past the context (the anchors read the context only)
    k_ours, v_ours = (jnp.pad(t, ((0, 0), (0, 0), (0, table - context))) for t in (k_all, v_all))
    results, on_gpu = [], jax.default_backend() == "gpu"
    for tiling in [{}] + tilings:
        full = {**default, **tiling}
        if kv_heads % full["heads_per_program"] or (not kv_fp8 and "fp8_unpack" in full):
            continue
        try:
            kernel_options = {k: v for k, v in full.items() if k != "fresh_counters"}
            out = paged_decode_attention(q, pool, 0, lens, k_ours[0], v_ours[0], num_pages=num_pages, **kernel_options)
            # and twice more with one set of counters, as a step's layers call it: a counter left nonzero by a
            # call would merge the next one early
            counters, err = decode_counters(batch, kv_heads), rel_err(out, ref)
            for _ in range(2):
                again, counters = paged_decode_attention_counted(q, pool, 0, lens, k_ours[0], v_ours[0], counters,
                                                                 num_pages=num_pages, **kernel_options)
                err = max(err, rel_err(again, ref))
            t = time_ours(q, pool, lens, k_ours, v_ours, num_pages, **full)
            # every kernel of one call (split pass, XLA's merge, a zeroing of fresh counters), each call from HBM
            kernels = device_kernels_us(q, pool, lens, k_ours[0], v_ours[0], num_pages, **full) if on_gpu else {}
        except Exception as e:  # noqa: BLE001
            print(f"  ours {full}: {type(e).__name__}: {str(e)[:160]}")
            continue
        results.append({"tiling": full, "us": t * 1e6, "rel_err": err, "default": tiling == {},
                        "device_us": sum(kernels.values()) if on_gpu else float("nan"), "kernels_us": kernels})
        print(f"  {full}: loop {t * 1e6:.1f} µs, device {results[-1]['device_us']:.1f} µs {kernels}, "
              f"rel. error {err:.1e}", flush=True)
    best = min(results, key=lambda r: r["us"])
    best_device = min(results, key=lambda r: r["device_us"]) if on_gpu else results[0]
    row = {"batch": batch, "context": context, "table": table, "heads": heads, "kv_heads": kv_heads,
           "kv_fp8": kv_fp8, "bytes": bytes_moved,
           "rotations": rotations, "ours_default_us": results[0]["us"], "ours_best_us": best["us"],
           "ours_best_tiling": best["tiling"], "ours_rel_err": max(r["rel_err"] for r in results),
           "ours_default_device_us": results[0]["device_us"], "ours_best_device_us": best_device["device_us"],
           "ours_best_device_tiling": best_device["tiling"], "variants": results}
    if anchors and not kv_fp8:
        t_jax, opts, jax_kernels = time_jax_pallas(q, pool, lens, k_all, v_all, kv_heads, on_gpu=on_gpu)
        if jax_kernels:
            row.update(jax_pallas_device_us=sum(jax_kernels.values()), jax_pallas_kernels_us=jax_kernels)
        if opts is not None:  # None: no tiling of JAX's divides the context's pages, or none lowered
            row.update(jax_pallas_us=t_jax * 1e6, jax_pallas_opts=opts)
        row.update(zip(("torch_sdpa_us", "torch_sdpa_graph_us"),
                       (t * 1e6 for t in time_torch_sdpa(q, pool, k_all, v_all, kv_heads, group))))
    for key in COLUMNS:
        if f"{key}_us" in row:
            row[f"{key}_share"] = bytes_moved / (row[f"{key}_us"] * 1e-6) / roof["hbm_bytes_per_s"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, interpret mode")
    ap.add_argument("--shapes", default=None, help="batch,context,heads,kv_heads;... (default: the six of the issue)")
    ap.add_argument("--no-anchors", action="store_true", help="skip JAX's kernel and torch SDPA")
    ap.add_argument("--tilings", type=json.loads, default=None, metavar="JSON",
                    help='our tilings to try beside the default, e.g. \'[{"combine": "kernel"}, {"splits": 16}]\' '
                         '("fresh_counters": true zeroes the merge counters every call, as before)')
    ap.add_argument("--table", type=int, default=0,
                    help="our page tables' width in tokens (as the engine's max_model_len; default: the context)")
    ap.add_argument("--kv-fp8", default="off", choices=("off", "on", "both"),
                    help="an FP8 cache (the engine's --kv-cache-dtype fp8); both: each shape with bf16, then FP8")
    ap.add_argument("--pool-pages", type=int, default=0,
                    help="spread the pages over a pool this many rows tall (the engine's per-layer share)")
    ap.add_argument("--block", type=int, default=1,
                    help="a sequence's tokens on runs of this many consecutive pages, as the engine's kv_block")
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    if args.quick or not on_gpu:
        global HEAD_DIM
        HEAD_DIM = 16
        shapes, anchors = [(2, 64, 4, 4), (1, 128, 8, 2)], False
        roof = {"hbm_bytes_per_s": 1e11, "matmul_flops_per_s": 1e12}
        tilings = [dict(block_k=32), dict(combine="kernel"), dict(combine="kernel", splits=4, min_split_keys=64),
                   dict(fp8_unpack="bits")]
    else:
        shapes, anchors = SHAPES, not args.no_anchors
        if args.shapes:
            shapes = [tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";")]
        t0 = time.perf_counter()
        roof = rooflines()
        print(f"rooflines ({time.perf_counter() - t0:.0f} s): {roof}", flush=True)
        tilings = [dict(block_k=16), dict(block_k=32), dict(block_k=64), dict(heads_per_program=1),
                   dict(heads_per_program=2), dict(num_stages=1), dict(num_stages=3), dict(num_warps=2),
                   dict(block_k=64, num_stages=3), dict(block_k=16, num_stages=3), dict(combine="kernel")]
        tilings = args.tilings if args.tilings is not None else tilings
    rows = []
    caches = {"off": [False], "on": [True], "both": [False, True]}[args.kv_fp8]
    for shape, kv_fp8 in [(shape, kv_fp8) for shape in shapes for kv_fp8 in caches]:
        t0 = time.perf_counter()
        row = bench(shape, roof, tilings, anchors, args.table, kv_fp8, args.pool_pages, args.block)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "variants"}, f"({time.perf_counter() - t0:.0f} s)", flush=True)
        # after every shape, so a run cut off by the device's time limit keeps the shapes it finished
        path = write_json("attention.json", {"env": environment(), "roofline": roof, "head_dim": HEAD_DIM,
                                             "pool_pages": args.pool_pages, "block": args.block, "rows": rows})
    print(f"\nroofline: copy {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s ({roof.get('hbm_source')}), "
          f"matmul {roof['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; us per call (share of the copy rate)")
    print("(loop: a timing loop's µs per call; device: the call's kernels in a profiler trace, from HBM)")
    print("(sdpa graph: torch SDPA's calls replayed from a CUDA graph, without Python's launches)")
    print(f"{'batch':>5} {'ctx':>5} {'q/kv':>6} {'kv':>4} {'ours loop':>14} {'best loop':>14} {'ours device':>14} "
          f"{'best device':>14} {'jax pallas':>14} {'jax device':>14} {'torch sdpa':>14} {'sdpa graph':>14}  "
          "best device tiling")
    for r in rows:
        cells = [f"{r[k + '_us']:7.1f} ({r[k + '_share']:4.0%})" if k + "_us" in r else f"{'-':>14}"
                 for k in COLUMNS]
        kv = "fp8" if r["kv_fp8"] else "bf16"
        print(f"{r['batch']:>5} {r['context']:>5} {r['heads']:>3}/{r['kv_heads']:<2} {kv:>4} {' '.join(cells)}  "
              f"{r['ours_best_device_tiling']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
