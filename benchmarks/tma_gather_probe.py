"""Can a Mosaic GPU kernel stream the LoRA's gathered pool rows at the copy rate? (issue 22, issue 17 item 5)

    PYTHONPATH=. python benchmarks/tma_gather_probe.py            # GPU: $OUT/tma_gather_probe.json
    PYTHONPATH=. python benchmarks/tma_gather_probe.py --quick    # CPU: Mosaic GPU's interpret mode

The Triton LoRA kernels read their adapter rows at ~48% of the copy rate: each program holds few bytes in flight,
limited by registers and shared memory. Pallas's Mosaic GPU backend moves blocks with the bulk tensor copy
engine (TMA) into shared memory, many steps in flight and no registers spent on the loads. Before rewriting the
kernels on it, this probe asks the one question that decides it: at S1's shapes (one adapter a row, rank 8:
a target's A is 8 pool rows of 4096), how fast do TMA copies of such rows, at pool rows chosen at random,
arrive? Each copy takes 8 rows (a target's rows on consecutive pages, which the adapter packer could promise)
or 1 (each row on a page of its own, as the page tables allow today).

Each program walks its share of (adapter block, column block) steps through emit_pipeline and adds every
block into a float32 accumulator in shared memory, so each byte is read and used. Checked against the gathered
blocks' sum in numpy; the rate is printed beside the best copy rate of the same run (read + written).
Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.common import copy_rates, environment, timed, write_json
from benchmarks.lora_tune import build, engine_tiling, kernel_split
from pallas_kernels.lora import lora_apply_group
from pallas_kernels.lora_expand import lora_expand
from pallas_kernels.lora_expand_mgpu import lora_expand_mgpu
from pallas_kernels.lora_shrink_mgpu import lora_shrink_mgpu
from pallas_kernels.mgpu_compat import kernel_params, strided_reader


def gather_sum(pool, starts, *, rows: int, block_k: int, programs: int, stages: int, interpret: bool = False):
    """-> [programs, rows, block_k] float32: program p's sum of the blocks pool[starts[p, s] * rows + (0..rows),
    k * block_k + (0..block_k)] over its steps s and column blocks k (starts in units of `rows` rows: one TMA
    copy a block)."""
    steps = starts.shape[1]
    col_blocks = pool.shape[1] // block_k
    read = strided_reader((rows, block_k), min(2, rows * block_k // 128), interpret)

    def tma_gather(starts_ref, pool_ref, out_ref, acc):
        p = jax.lax.axis_index("p")
        acc[...] = jnp.zeros((rows, block_k), jnp.float32)

        def body(_, block):
            acc[...] = read(acc) + read(block).astype(jnp.float32)

        plgpu.emit_pipeline(
            body, grid=(steps, col_blocks),
            in_specs=[plgpu.BlockSpec((rows, block_k), lambda s, k: (starts_ref[p, s], k))],
            max_concurrent_steps=stages)(pool_ref)
        plgpu.commit_smem()  # the accumulator's last stores, before the copy engine reads it
        plgpu.copy_smem_to_gmem(acc, out_ref.at[p])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(tma_gather, out_type=jax.ShapeDtypeStruct((programs, rows, block_k), jnp.float32),
                        scratch_types=[plgpu.SMEM((rows, block_k), jnp.float32)],
                        grid=(programs,), grid_names=("p",), **kernel_params(interpret))
    return call(starts, pool)


def reference(pool, starts, rows: int, block_k: int):
    """gather_sum in numpy (the pool's rows gathered on its device)."""
    ids = (np.asarray(starts)[..., None] * rows + np.arange(rows)).reshape(starts.shape[0], -1)
    blocks = np.asarray(jnp.take(pool, jnp.asarray(ids), axis=0), np.float32)  # [programs, steps * rows, W]
    blocks = blocks.reshape(starts.shape[0], -1, rows, pool.shape[1] // block_k, block_k)
    return blocks.sum(axis=(1, 3))


def shrink_forms(quick: bool, block_ks, stages_list) -> list[dict]:
    """S1's q, k, v LoRA (lora_tune's s1_qkv: 240 rows, 226 rank-8 adapters) three ways: the engine's (the
    Triton kernels on gathered tiles, its tiling), and the Mosaic GPU shrink (pallas_kernels.lora_shrink_mgpu,
    per token) before the Triton expand or the Mosaic GPU one. Each checked against the problem's float64
    deltas; on the GPU, device us by kernel with L2 flushed before each call (lora_tune.kernel_split)."""
    hidden, rows, distinct = (256, 24, 20) if quick else (4096, 240, 226)
    p, forms, _ = build(np.random.default_rng(1), hidden, rows, distinct, [8], 3, 16)
    num_pages = p["num_pages"]
    tiling = {k: v for k, v in engine_tiling(16).items() if v is not None}

    def engine(ys, x, pool, layer, tile_rank, a_pages, b_pages, tile_rows):
        return lora_apply_group(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows, num_pages=num_pages,
                                tokens_per_tile=16, interpret=quick, **tiling)

    def mgpu(block_k, stages, both, ys, x, pool, layer, tile_rank, a_pages, b_pages, tile_rows):
        opts = dict(num_pages=num_pages, stages=stages, interpret=quick)
        v = lora_shrink_mgpu(x, pool, layer, tile_rank, a_pages, block_k=block_k, **opts)
        if both:
            return lora_expand_mgpu(v, ys, pool, layer, tile_rank, b_pages, block_n=block_k, **opts)
        return lora_expand(v, ys, pool, layer, tile_rank, b_pages, num_pages=num_pages, interpret=quick)

    # the A rows (and as many B rows) each row reads, per token; the gathered engine reads a shared adapter once
    shrink_bytes = int(p["tile_rank"].sum()) * hidden * 2
    runs = [("engine (Triton, gathered)", "gathered", engine)]
    runs += [(f"mgpu shrink bk={bk} st={st}" + (" + mgpu expand" if both else " + Triton expand"), "per_token",
              functools.partial(mgpu, bk, st, both)) for both in (False, True) for bk in block_ks for st in stages_list]
    results = []
    for name, layout, run in runs:
        a = forms[layout]
        operands = (a["x"], a["pool"], a["layer"], a["tile_rank"], a["a_pages"], a["b_pages"], a["tile_rows"])
        row = {"form": name, "shrink_bytes": shrink_bytes}
        try:
            out = jax.jit(run)(a["ys"], *operands)
            row["rel_err"] = max(float(np.linalg.norm(np.asarray(o, np.float64) - np.asarray(y, np.float64) - d)
                                       / np.linalg.norm(d)) for o, y, d in zip(out, a["ys"], p["deltas"]))
            if not quick:
                row["kernels_us"] = kernel_split(run, a["ys"], operands, flush_l2=True)
        except Exception as e:  # a form Mosaic GPU rejects is a result, not the end of the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(row, flush=True)
        results.append(row)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=226, help="adapter blocks a launch reads (S1: ~226 a step)")
    ap.add_argument("--targets", type=int, default=3, help="blocks an adapter gives (q, k, v)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--pool-blocks", type=int, default=200_000, help="rank-row blocks in the pool (~13 GB)")
    ap.add_argument("--block-k", default="128,256")
    ap.add_argument("--stages", default="2,4,8")
    ap.add_argument("--programs", default="132,264")
    ap.add_argument("--rows-per-copy", default="8,1",
                    help="rank rows a TMA copy takes: 8 (a target's rows on consecutive pages), 1 (each row alone)")
    ap.add_argument("--no-shrink", dest="shrink", action="store_false",
                    help="skip the Mosaic GPU shrink beside the engine's Triton kernels")
    ap.add_argument("--shrink-block-k", default="128,256")
    ap.add_argument("--shrink-stages", default="4,8")
    ap.add_argument("--quick", action="store_true", help="tiny shapes in Mosaic GPU's interpret mode (CPU)")
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.pool_blocks, args.width = 8, 64, 256
        args.block_k, args.stages, args.programs, args.rows_per_copy = "128", "2", "4", "8,1"
        args.shrink_block_k, args.shrink_stages = "128", "2"
    rng = np.random.default_rng(0)
    # on the device: the full pool is ~13 GB
    pool = jax.random.normal(jax.random.PRNGKey(0), (args.pool_blocks * args.rank, args.width), jnp.bfloat16)
    blocks = args.adapters * args.targets
    nbytes = blocks * args.rank * args.width * 2
    copy = None if args.quick else {k: v for k, v in copy_rates().items() if isinstance(v, float)}
    copy_tb_s = max(copy.values()) / 1e12 if copy else None
    results = []
    sweep = itertools.product(map(int, args.rows_per_copy.split(",")), map(int, args.programs.split(",")))
    for rows, programs in sweep:
        steps = -(-blocks * (args.rank // rows) // programs)
        starts = jnp.asarray(rng.integers(1, args.pool_blocks * (args.rank // rows), (programs, steps)), jnp.int32)
        read = programs * steps * rows * args.width * 2
        for block_k in map(int, args.block_k.split(",")):
            want = reference(pool, starts, rows, block_k)
            for stages in map(int, args.stages.split(",")):
                fn = jax.jit(functools.partial(gather_sum, rows=rows, block_k=block_k, programs=programs,
                                               stages=stages, interpret=args.quick))
                row = dict(rows_per_copy=rows, programs=programs, block_k=block_k, stages=stages)
                try:
                    got = np.asarray(fn(pool, starts))
                    row["rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
                    if not args.quick:
                        # each call's starts take a zero from the last one's output: calls run back to back
                        seconds = timed(lambda s, pl_: s + (fn(pl_, s)[0, 0, 0] * 0).astype(s.dtype), starts, pool)
                        row |= dict(us=seconds * 1e6, tb_s=read / seconds / 1e12)
                except Exception as e:  # a shape Mosaic GPU rejects is a result, not the end of the sweep
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                results.append(row)
                print(row, flush=True)
    shrinks = (shrink_forms(args.quick, [int(b) for b in args.shrink_block_k.split(",")],
                            [int(s) for s in args.shrink_stages.split(",")]) if args.shrink else [])
    path = write_json("tma_gather_probe.json", {"env": environment(), "args": vars(args), "copy_rates": copy,
                                                 "bytes": nbytes, "results": results, "shrinks": shrinks})
    print(f"\n{blocks} blocks of {args.rank} x {args.width} bf16 ({nbytes / 1e6:.1f} MB) at random pool rows; "
          f"best copy rate (read + written) {copy_tb_s and round(copy_tb_s, 2)} TB/s")
    print(f"{'rows':>5} {'programs':>9} {'block_k':>8} {'stages':>7} {'us':>8} {'TB/s':>6} {'of copy':>8} {'err':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['rows_per_copy']:>5} {r['programs']:>9} {r['block_k']:>8} {r['stages']:>7}  {r['error'][:60]}")
            continue
        us, tb = r.get("us", float("nan")), r.get("tb_s", float("nan"))
        share = tb / copy_tb_s if copy_tb_s else float("nan")
        print(f"{r['rows_per_copy']:>5} {r['programs']:>9} {r['block_k']:>8} {r['stages']:>7} {us:>8.1f} "
              f"{tb:>6.2f} {share:>8.0%} {r['rel_err']:>8.1e}")
    if shrinks:
        print("\nS1's q, k, v LoRA: device us by kernel (L2 flushed); rate = A's (or B's) rows' bytes / its us")
    for r in shrinks:
        kernels = r.get("kernels_us", {})

        def rate(kind):
            us = next((us for k, us in kernels.items() if kind in k), None)
            tb = r["shrink_bytes"] / us / 1e6 if us else float("nan")
            return f"{tb:.2f} TB/s ({tb / copy_tb_s if copy_tb_s else float('nan'):.0%})"
        detail = r.get("error") or " ".join(f"{k}={us:.1f}" for k, us in kernels.items())
        print(f"  {r['form']:<42} err {r.get('rel_err', float('nan')):.1e}  shrink {rate('shrink')}  "
              f"expand {rate('expand')}  {detail[:80]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
