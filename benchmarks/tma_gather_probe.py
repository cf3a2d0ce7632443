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

from benchmarks.common import copy_rates, environment, timed, write_json


def gather_sum(pool, starts, *, rows: int, block_k: int, programs: int, stages: int, interpret: bool = False):
    """-> [programs, rows, block_k] float32: program p's sum of the blocks pool[starts[p, s] * rows + (0..rows),
    k * block_k + (0..block_k)] over its steps s and column blocks k (starts in units of `rows` rows: one TMA
    copy a block)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    steps = starts.shape[1]
    col_blocks = pool.shape[1] // block_k

    def kernel(starts_ref, pool_ref, out_ref, acc):
        p = jax.lax.axis_index("p")
        acc[...] = jnp.zeros((rows, block_k), jnp.float32)

        # one register layout for both loads: left to itself Mosaic GPU gives bf16 4-element vectors and
        # float32 2-element ones, and will not add the two (interpret mode has no layouts, nor plgpu.load)
        layout = plgpu.Layout.WG_STRIDED((rows, block_k), vec_size=min(2, rows * block_k // 128))

        def read(ref):
            return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

        def body(_, block):
            acc[...] = read(acc) + read(block).astype(jnp.float32)

        plgpu.emit_pipeline(
            body, grid=(steps, col_blocks),
            in_specs=[plgpu.BlockSpec((rows, block_k), lambda s, k: (starts_ref[p, s], k))],
            max_concurrent_steps=stages)(pool_ref)
        plgpu.commit_smem()  # the accumulator's last stores, before the copy engine reads it
        plgpu.copy_smem_to_gmem(acc, out_ref.at[p])
        plgpu.wait_smem_to_gmem(0)

    params = {}
    if interpret:
        # Mosaic GPU's interpret mode has no public name in jax 0.10 (the CPU's): the private one
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params["interpret"] = InterpretGPUParams()
    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((programs, rows, block_k), jnp.float32),
                        scratch_types=[plgpu.SMEM((rows, block_k), jnp.float32)],
                        grid=(programs,), grid_names=("p",), **params)
    return call(starts, pool)


def reference(pool, starts, rows: int, block_k: int):
    """gather_sum in numpy (the pool's rows gathered on its device)."""
    ids = (np.asarray(starts)[..., None] * rows + np.arange(rows)).reshape(starts.shape[0], -1)
    blocks = np.asarray(jnp.take(pool, jnp.asarray(ids), axis=0), np.float32)  # [programs, steps * rows, W]
    blocks = blocks.reshape(starts.shape[0], -1, rows, pool.shape[1] // block_k, block_k)
    return blocks.sum(axis=(1, 3))


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
    ap.add_argument("--quick", action="store_true", help="tiny shapes in Mosaic GPU's interpret mode (CPU)")
    args = ap.parse_args()
    if args.quick:
        args.adapters, args.pool_blocks, args.width = 8, 64, 256
        args.block_k, args.stages, args.programs, args.rows_per_copy = "128", "2", "4", "8,1"
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
    path = write_json("tma_gather_probe.json", {"env": environment(), "args": vars(args), "copy_rates": copy,
                                                 "bytes": nbytes, "results": results})
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
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
