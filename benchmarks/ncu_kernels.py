"""Run one of our kernels a few times and nothing else, for Nsight Compute (`ncu`) to profile.

    PYTHONPATH=. ncu --clock-control none --kernel-name regex:'paged_decode_attention|lora_' \
        --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python benchmarks/ncu_kernels.py attention --shape 256,160,32,32 [--kv-fp8] [--tiling '{"block_k": 64}']
    PYTHONPATH=. ncu ... python benchmarks/ncu_kernels.py lora --problem s1_qkv
    PYTHONPATH=. python benchmarks/ncu_kernels.py attention --quick     # CPU smoke run (interpret mode)

The timing scripts time through JAX's profiler (CUPTI), which cannot run under ncu: every earlier ncu run on
the LoRA kernels (lora_tune.py) ended with "Failed to profile" and exit code 9. This driver builds the same
problems as benchmarks/attention.py and benchmarks/lora_tune.py and only calls the kernel, `--calls` times.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import attention as attention_bench
from benchmarks import lora_tune
from pallas_kernels.attention import paged_decode_attention
from pallas_kernels.decode_tiling import decode_launch_params
from pallas_kernels.lora import lora_apply_group


def attention_call(shape, kv_fp8: bool, tiling: dict, pool_pages: int, block: int, table: int):
    """A jitted call of paged_decode_attention over attention.py's problem, and its arguments."""
    batch, context, heads, kv_heads = shape
    head_dim = attention_bench.HEAD_DIM
    pool, k_all, v_all, num_pages = attention_bench.problem(jax.random.PRNGKey(0), batch, context, kv_heads, 1,
                                                            kv_fp8, pool_pages, block)
    table = max(table, context)
    k_pages, v_pages = (jnp.pad(t[0], ((0, 0), (0, table - context))) for t in (k_all, v_all))
    q = jax.random.normal(jax.random.PRNGKey(7), (batch, heads, head_dim), jnp.bfloat16)
    lens = jnp.full((batch,), context, jnp.int32)
    opts = {**decode_launch_params(batch, kv_heads, heads // kv_heads, table), "kv_fp8": kv_fp8, **tiling}
    call = jax.jit(lambda *a: paged_decode_attention(*a, num_pages=num_pages, **opts))
    return call, (q, pool, 0, lens, k_pages, v_pages)


def lora_call(problem: str, overrides: dict):
    """The engine's decode LoRA group (lora_apply_group at its default tiling, with overrides) over
    lora_tune.py's problem."""
    rows, distinct, ranks, targets, max_rank = lora_tune.PROBLEMS[problem]
    p, layouts, _ = lora_tune.build(np.random.default_rng(0), lora_tune.H, rows, distinct, ranks, targets, max_rank)
    a = layouts["gathered"]
    tiling = {k: v for k, v in (lora_tune.engine_tiling(max_rank) | overrides).items() if v is not None}
    call = jax.jit(lambda ys, *ops: lora_apply_group(ops[0], ys, *ops[1:], num_pages=p["num_pages"],
                                                     tokens_per_tile=16, **tiling))
    return call, (a["ys"], a["x"], a["pool"], a["layer"], a["tile_rank"], a["a_pages"], a["b_pages"], a["tile_rows"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=("attention", "lora"))
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--shape", default="256,160,32,32", help="attention: batch,context,heads,kv_heads")
    ap.add_argument("--kv-fp8", action="store_true")
    ap.add_argument("--tiling", type=json.loads, default={}, help="options over the kernel's default tiling")
    ap.add_argument("--pool-pages", type=int, default=418832)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--table", type=int, default=2048)
    ap.add_argument("--problem", default="s1_qkv", choices=tuple(lora_tune.PROBLEMS))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, interpret mode")
    args = ap.parse_args()
    if args.quick or jax.default_backend() != "gpu":
        attention_bench.HEAD_DIM = 16
        args.shape, args.pool_pages, args.table = "2,64,4,4", 0, 64
        lora_tune.H = 128
        lora_tune.PROBLEMS = {**lora_tune.PROBLEMS, args.problem: (40, 30, [8], 3, 16)}
    if args.kernel == "attention":
        shape = tuple(int(x) for x in args.shape.split(","))
        call, operands = attention_call(shape, args.kv_fp8, args.tiling, args.pool_pages, args.block, args.table)
    else:
        call, operands = lora_call(args.problem, args.tiling)
    for _ in range(args.calls):
        out = call(*operands)
    jax.block_until_ready(out)
    print(f"{args.kernel}: {args.calls} calls, output {jax.tree_util.tree_map(lambda x: x.shape, out)}")


if __name__ == "__main__":
    main()
