"""The residual add and the RMSNorm after it, in one pass: s = x + delta, out = weight * rms_norm(s).

XLA makes a layer's two norms three launches each at small batches (the add of a split-K GEMM's output to
the residual, the mean of squares, the scaling: `benchmarks/engine.py --profile-batch 1` lists them as
loop_add, input_reduce and loop_multiply fusions of ~1-1.5 µs), where a step is mostly launches. Here each
norm is one launch, as vLLM's fused_add_rms_norm. Numbers as jslora.model.layers.rms_norm: the sum rounded to
x's dtype first, the mean of its squares in float32, the normalized row rounded to x's dtype, then scaled.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import load, pallas_call, resolve_interpret, store


def _add_rms_norm_kernel(*refs, width: int, block_width: int, eps: float, has_delta: bool):
    if has_delta:  # sum_ref is x's buffer (aliased): each program reads its row before it writes it
        x_ref, delta_ref, weight_ref, sum_ref, out_ref = refs
    else:
        (x_ref, weight_ref, out_ref), delta_ref, sum_ref = refs, None, None
    # one program per row, the row one block (Triton blocks are powers of two, so a 5120-wide row of
    # Llama-13B is a masked 8192-wide block): at batch 256 that is 256 programs of 8 KB
    row = pl.program_id(0)
    col = jnp.arange(block_width)
    live = col < width
    at_col = jnp.minimum(col, width - 1)  # loads stay inside the row; stores go to the live columns only
    x = load(x_ref.at[row, at_col], mask=live, other=0)
    if has_delta:
        x = (x.astype(jnp.float32) + load(delta_ref.at[row, at_col], mask=live, other=0).astype(jnp.float32))
        x = x.astype(sum_ref.dtype)
        store(sum_ref.at[row, col], x, mask=live)
    xf = x.astype(jnp.float32)
    mean_square = jnp.sum(xf * xf) / width
    normed = (xf * jax.lax.rsqrt(mean_square + eps)).astype(x.dtype)
    weight = load(weight_ref.at[at_col], mask=live, other=0)
    store(out_ref.at[row, col], (weight * normed).astype(out_ref.dtype), mask=live)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x, delta, weight, *, eps: float, interpret: bool | None = None):
    """x, delta [..., H] (delta may be None), weight [H] -> (s = x + delta in x's dtype, weight * rms_norm(s)):
    what `s = x + delta; rms_norm(s, weight, eps)` gives, in one launch. With delta, s is written over x's
    buffer (in place inside a jitted step that no longer needs x); without, s is x."""
    shape, width = x.shape, x.shape[-1]
    x2 = x.reshape(-1, width)
    rows = x2.shape[0]
    block_width = 1 << (width - 1).bit_length()
    has_delta = delta is not None
    kernel = functools.partial(_add_rms_norm_kernel, width=width, block_width=block_width, eps=eps,
                               has_delta=has_delta)
    out_dtype = jnp.result_type(weight.dtype, x.dtype)
    normed = jax.ShapeDtypeStruct((rows, width), out_dtype)
    grid = (rows,)
    # a wide row's float32 block spread over more threads (Llama-70B's 8192 floats: 32 a thread at 8 warps)
    warps = 4 if block_width <= 4096 else 8
    if has_delta:
        call = pallas_call(kernel, out_shape=(jax.ShapeDtypeStruct((rows, width), x.dtype), normed), grid=grid,
                           input_output_aliases={0: 0}, num_warps=warps, interpret=resolve_interpret(interpret),
                           name="add_rms_norm")
        total, out = call(x2, delta.reshape(-1, width), weight)
        return total.reshape(shape), out.reshape(shape)
    call = pallas_call(kernel, out_shape=normed, grid=grid, num_warps=warps,
                       interpret=resolve_interpret(interpret), name="rms_norm")
    return x, call(x2, weight).reshape(shape)
