"""A GEMM over FP8 weights for decode-sized row counts: y = x @ (weight * scale), with weight float8
e4m3 [K, N], one float32 scale per output column, x bf16 (or f32) [M, K], M small (1-64).

Reading weights is all a decode step's GEMM does, so the kernel reads each FP8 byte once and up-casts
it in registers (XLA's GEMMs up-cast in a separate pass or stall: benchmarks/RESULTS.md). Program
(j, s) of the grid (N / block_n, splits) owns output columns j * block_n .. and the s-th slice of K:
it walks its slice in block_k steps, up-casting the weight tile and multiplying on tensor cores (rows
padded to 16), and writes a float32 partial sum. Splitting K gives enough programs to fill the SMs when
N / block_n alone does not (o and down: N = 4096 is 32 programs of 128 columns). XLA then adds the
partial sums, scales the columns and casts (one small fused pass over splits x M x N).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pool import round_up
from pallas_kernels.triton_compat import contract_middle, default_interpret, pallas_call, power_of_two_block

TARGET_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs


def default_splits(k: int, n: int, block_n: int, block_k: int) -> int:
    """K slices so that the grid has about TARGET_PROGRAMS programs (a power of two dividing K's blocks)."""
    k_blocks, splits = k // block_k, 1
    while (n // block_n) * splits * 2 <= TARGET_PROGRAMS and k_blocks % (splits * 2) == 0:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "interpret", "num_warps",
                                             "num_stages"))
def fp8_gemm(x, weight, scale, *, block_n: int = 128, block_k: int = 128, splits: int | None = None,
             interpret: bool | None = None, num_warps: int = 4, num_stages: int = 3):
    """x [M, K] @ (weight [K, N] FP8 * scale [N]) -> [M, N] in x's dtype, float32 accumulation."""
    m, k = x.shape
    n = weight.shape[1]
    block_n = power_of_two_block(n, cap=block_n)
    block_k = power_of_two_block(k, cap=block_k)
    splits = splits or default_splits(k, n, block_n, block_k)
    if (k // block_k) % splits:
        raise ValueError(f"splits {splits} must divide K's {k // block_k} blocks of {block_k}")
    steps = k // block_k // splits
    rows = max(16, round_up(m, 16))  # tensor-core dots need 16 rows
    x_rows = jnp.zeros((rows, k), x.dtype).at[:m].set(x)

    def kernel(x_ref, w_ref, out_ref):
        j, s = pl.program_id(0), pl.program_id(1)
        columns = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

        def body(i, acc):
            k0 = pl.multiple_of((s * steps + i) * block_k, block_k)
            xs = x_ref[:, pl.ds(k0, block_k)]
            ws = w_ref[pl.ds(k0, block_k), columns].astype(xs.dtype)
            return acc + contract_middle(xs, ws)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, block_n), jnp.float32))
        out_ref[s, :, columns] = acc

    partial_sums = pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32), grid=(n // block_n, splits),
        interpret=default_interpret() if interpret is None else interpret, num_warps=num_warps,
        num_stages=num_stages, name="fp8_gemm")(x_rows, weight)
    return (partial_sums.sum(axis=0)[:m] * scale).astype(x.dtype)
