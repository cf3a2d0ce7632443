"""A GEMM over FP8 weights for decode-sized row counts: y = x @ (weight * scale).T, with weight float8
e4m3 [N, K] (K contiguous, as jslora.model.quant stores it), one float32 scale per output column, x
bf16 (or f32) [M, K], M small (1-64).

Reading weights is all a decode step's GEMM does, so the kernel reads each FP8 byte once and up-casts
it in registers (XLA's GEMMs up-cast in a separate pass or stall: benchmarks/RESULTS.md). Program
(j, s) of the grid (N / block_n, splits) owns output columns j * block_n .. and the s-th slice of K:
it walks its slice in block_k steps, up-casting the weight tile and multiplying on tensor cores (rows
padded to 16), and writes a float32 partial sum. Splitting K gives enough programs to fill the SMs when
N / block_n alone does not (o and down: N = 4096 is 32 programs of 128 columns). XLA then adds the
partial sums, scales the columns and casts (one small fused pass over splits x M x N).

Tile sizes, K splits, warps and pipeline stages are read from a tuning file per GPU kind
(`tuned/fp8_gemm_<device>.json`, written by `benchmarks/fp8_gemm_tune.py`, as vLLM keeps its tuned
kernel configs), keyed by (K, N) and the smallest tuned row count >= M; arguments passed override it.
"""
from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pool import round_up
from pallas_kernels.triton_compat import contract_last, default_interpret, pallas_call, power_of_two_block

TARGET_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs
DEFAULTS = {"block_n": 128, "block_k": 128, "splits": None, "num_warps": 4, "num_stages": 3}
TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")


def tuning_file(device_kind: str) -> str:
    return os.path.join(TUNED_DIR, "fp8_gemm_" + re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") + ".json")


@functools.cache
def _tuned_entries(device_kind: str) -> tuple:
    try:
        with open(tuning_file(device_kind)) as f:
            return tuple(json.load(f)["entries"])
    except FileNotFoundError:
        return ()


def tuned_config(m: int, k: int, n: int, device_kind: str | None = None) -> dict:
    """The tuned launch parameters for an [m, k] x [k, n] product on this GPU kind (DEFAULTS where no
    entry has this (k, n)): the entry with the smallest row count >= m, else the largest."""
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    same_shape = sorted((e for e in _tuned_entries(kind) if e["k"] == k and e["n"] == n), key=lambda e: e["rows"])
    if not same_shape:
        return dict(DEFAULTS)
    entry = next((e for e in same_shape if e["rows"] >= m), same_shape[-1])
    return {**DEFAULTS, **entry["config"]}


def default_splits(k: int, n: int, block_n: int, block_k: int) -> int:
    """K slices so that the grid has about TARGET_PROGRAMS programs (a power of two dividing K's blocks)."""
    k_blocks, splits = k // block_k, 1
    while (n // block_n) * splits * 2 <= TARGET_PROGRAMS and k_blocks % (splits * 2) == 0:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "interpret", "num_warps",
                                             "num_stages"))
def fp8_gemm(x, weight, scale, *, block_n: int | None = None, block_k: int | None = None, splits: int | None = None,
             interpret: bool | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """x [M, K] @ (weight [N, K] FP8 * scale [N, None]).T -> [M, N] in x's dtype, float32 accumulation.
    Launch parameters left None come from the tuning file (tuned_config)."""
    m, k = x.shape
    n = weight.shape[0]
    tuned = tuned_config(m, k, n)
    block_n, block_k, num_warps, num_stages = (
        given if given is not None else tuned[name] for given, name in
        ((block_n, "block_n"), (block_k, "block_k"), (num_warps, "num_warps"), (num_stages, "num_stages")))
    splits = splits or tuned["splits"]
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
            ws = w_ref[columns, pl.ds(k0, block_k)].astype(xs.dtype)
            return acc + contract_last(xs, ws)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((rows, block_n), jnp.float32))
        out_ref[s, :, columns] = acc

    partial_sums = pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32), grid=(n // block_n, splits),
        interpret=default_interpret() if interpret is None else interpret, num_warps=num_warps,
        num_stages=num_stages, name="fp8_gemm")(x_rows, weight)
    return (partial_sums.sum(axis=0)[:m] * scale).astype(x.dtype)
