"""Rope and the K/V write in one pass: the query and key rotated, the keys and values written into their
pool pages, the rotated query returned for attention.

XLA leaves a layer's rope as one fusion for q and one for k beside the K/V write kernel (three launches of
~1-2 µs a layer at small batches, where a step is mostly launches: benchmarks/engine.py --profile-batch);
here they are one. Rotation as transformers' rotate_half: for each head's halves x1, x2 and the token's
cos, sin over the head dimension, out = (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.kv_fp8 import pack as pack_fp8
from pallas_kernels.kv_fp8 import phases_of, value_offset
from pallas_kernels.triton_compat import load, pallas_call, power_of_two_block, resolve_interpret, store


def _halves(row, heads, half):
    """Token `row`'s place in an [N, H * D] array, and each of `heads`' two halves there: index arrays,
    [len(heads), half] each."""
    cols = heads[:, None] * (2 * half) + jnp.arange(half)[None, :]
    return jnp.full_like(cols, row), (cols, cols + half)


def _rotated(ref, row, heads, half, cos, sin):
    """Token `row`'s `heads` of ref rotated: its (first, second) halves, each [len(heads), half] float32."""
    rows, (first, second) = _halves(row, heads, half)
    x1, x2 = (load(ref.at[rows, cols]).astype(jnp.float32) for cols in (first, second))
    (c1, c2), (s1, s2) = cos, sin
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


def _rotated_phases(ref, t, heads, half, cos_ref, sin_ref, phases: int) -> list:
    """Token t's `heads` of ref rotated, as FP8 phases (pallas_kernels.kv_fp8): phase p holds each head's
    elements p, p + phases, ..., [len(heads), 2 half / phases] float32 each; an element's partner is half a
    head away, as in _rotated."""
    out = []
    for p in range(phases):
        elems = p + phases * jnp.arange(2 * half // phases)
        first = elems < half
        partner = jnp.where(first, elems + half, elems - half)
        cols, partner_cols = (heads[:, None] * (2 * half) + e[None, :] for e in (elems, partner))
        rows = jnp.full_like(cols, t)
        x, x_partner = (load(ref.at[rows, c]).astype(jnp.float32) for c in (cols, partner_cols))
        trig_cols = (jnp.full((1, elems.shape[0]), t), elems[None, :])
        cos, sin = (load(r.at[trig_cols]).astype(jnp.float32) for r in (cos_ref, sin_ref))
        out.append(x * cos + jnp.where(first, -1.0, 1.0)[None, :] * x_partner * sin)
    return out


def _write_fp8(pool_ref, row, heads, phases: int, values, start: int):
    """Heads' FP8 phases packed into pool row `row` from word `start` (pallas_kernels.kv_fp8's layout)."""
    words = heads[:, None] * values[0].shape[1] + jnp.arange(values[0].shape[1])[None, :]
    store(pool_ref.at[jnp.full_like(words, row), start + words], pack_fp8(values, pool_ref.dtype))


def _rope_kv_kernel(layer_ref, kp_ref, vp_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, _pool_ref, q_out_ref, pool_ref,
                    *, head_block, kv_blocks, half, num_pages, phases):
    # one program per (token, block of head_block heads): the block's query heads, and its key and value
    # heads where the block has some (GQA has fewer)
    t, block = pl.program_id(0), pl.program_id(1)
    heads = block * head_block + jnp.arange(head_block)
    trig = [tuple(ref[pl.ds(t, 1), pl.ds(h * half, half)].astype(jnp.float32) for h in (0, 1))
            for ref in (cos_ref, sin_ref)]   # cos = (cos1, cos2), sin = (sin1, sin2), [1, half] each
    rows, halves = _halves(t, heads, half)
    for cols, value in zip(halves, _rotated(q_ref, t, heads, half, *trig)):
        store(q_out_ref.at[rows, cols], value.astype(q_out_ref.dtype))

    @pl.when(block < kv_blocks)
    def _():
        base = layer_ref[0] * num_pages
        k_page, v_page = kp_ref[t], vp_ref[t]

        @pl.when(k_page != 0)  # padding tokens point at the null page, which must stay zero
        def _():
            if phases > 1:  # rounded to k's dtype first, as apply_rope then write_kv do
                values = [x.astype(k_ref.dtype) for x in _rotated_phases(k_ref, t, heads, half, cos_ref, sin_ref,
                                                                          phases)]
                _write_fp8(pool_ref, base + k_page, heads, phases, values, 0)
                return
            for cols, value in zip(halves, _rotated(k_ref, t, heads, half, *trig)):
                store(pool_ref.at[jnp.full_like(cols, base + k_page), cols], value.astype(pool_ref.dtype))

        @pl.when(v_page != 0)
        def _():
            if phases > 1:
                elems = jnp.arange(2 * half // phases)
                values = [load(v_ref.at[jnp.full((heads.shape[0], elems.shape[0]), t),
                                        heads[:, None] * (2 * half) + p + phases * elems[None, :]])
                          for p in range(phases)]
                _write_fp8(pool_ref, base + v_page, heads, phases, values, value_offset(pool_ref.shape[1], phases))
                return
            for cols in halves:
                value = load(v_ref.at[rows, cols])
                store(pool_ref.at[jnp.full_like(cols, base + v_page), cols], value.astype(pool_ref.dtype))


@functools.partial(jax.jit, static_argnames=("num_pages", "kv_fp8", "interpret"))
def rope_write_kv(q, k, v, cos, sin, pool, layer, k_pages, v_pages, *, num_pages: int, kv_fp8: bool = False,
                  interpret: bool | None = None):
    """q [N, Hq, D], k and v [N, Hkv, D] of N tokens before rope; cos, sin [N, D] (jslora.model.layers.rope_cos_sin).
    Writes token t's rotated key and its value on pages k_pages[t], v_pages[t] of `layer` (in place inside a
    jitted step that donates the pool; null-page entries are skipped) and returns (the rotated q [N, Hq, D],
    pool): what apply_rope on q and k and then write_kv give. kv_fp8: written as write_kv(kv_fp8=True) does."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # power-of-two blocks of heads (Triton's shapes), dividing both counts: Llama-13B has 40 of each
    head_block = power_of_two_block(num_heads, num_kv_heads, cap=32)
    kernel = functools.partial(_rope_kv_kernel, head_block=head_block, kv_blocks=num_kv_heads // head_block,
                               half=head_dim // 2, num_pages=num_pages, phases=phases_of(pool.dtype) if kv_fp8 else 1)
    call = pallas_call(kernel, out_shape=(jax.ShapeDtypeStruct((tokens, num_heads * head_dim), q.dtype),
                                          jax.ShapeDtypeStruct(pool.shape, pool.dtype)),
                       grid=(tokens, num_heads // head_block), input_output_aliases={8: 1},
                       interpret=resolve_interpret(interpret), name="rope_write_kv")
    q_out, pool = call(jnp.reshape(layer, (1,)).astype(jnp.int32), k_pages, v_pages, cos, sin,
                       q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1), pool)
    return q_out.reshape(q.shape), pool
