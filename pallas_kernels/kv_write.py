"""The K/V write: a step's new keys and values onto their pages of the unified pool, in place.

Token t's key goes to pool row layer * num_pages + k_pages[t] (all kv heads side by side), its value to
v_pages[t]; padding tokens name the null page and are skipped. With kv_fp8 the rows hold FP8 values packed
into pool words, keys first (pallas_kernels.kv_fp8).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.kv_fp8 import pack as pack_fp8
from pallas_kernels.kv_fp8 import phases_of, value_offset
from pallas_kernels.triton_compat import load, pallas_call, power_of_two_block, resolve_interpret, store


def _write_kernel(layer_ref, kp_ref, vp_ref, k_ref, v_ref, pool_ref, out_ref, *, num_pages, width):
    t, cols = pl.program_id(0), pl.ds(pl.program_id(1) * width, width)
    base = layer_ref[0] * num_pages
    for pages_ref, src_ref in ((kp_ref, k_ref), (vp_ref, v_ref)):
        page = pages_ref[t]

        @pl.when(page != 0)  # padding tokens point at the null page, which must stay zero
        def _():
            out_ref[pl.ds(base + page, 1), cols] = src_ref[pl.ds(t, 1), cols].astype(out_ref.dtype)


def _write_fp8_kernel(layer_ref, kp_ref, vp_ref, k_ref, v_ref, pool_ref, out_ref, *, num_pages, width, phases):
    # a block of `width` pool words: the token's values phases * width .. as FP8, `phases` to a word
    t, words = pl.program_id(0), pl.program_id(1) * width + jnp.arange(width)
    base = layer_ref[0] * num_pages
    for pages_ref, src_ref, start in ((kp_ref, k_ref, 0), (vp_ref, v_ref, value_offset(out_ref.shape[1], phases))):
        page = pages_ref[t]

        @pl.when(page != 0)  # padding tokens point at the null page, which must stay zero
        def _():
            token = jnp.full((1, width), t)
            packed = pack_fp8([load(src_ref.at[token, (words * phases + p)[None, :]]) for p in range(phases)],
                              out_ref.dtype)
            store(out_ref.at[jnp.full((1, width), base + page), (start + words)[None, :]], packed)


@functools.partial(jax.jit, static_argnames=("num_pages", "kv_fp8", "interpret"))
def write_kv(pool, layer, k_pages, v_pages, k, v, *, num_pages: int, kv_fp8: bool = False,
             interpret: bool | None = None):
    """pool with token t's k [N, Hkv*D] and v written on pages k_pages[t], v_pages[t] of `layer`
    (in place inside a jitted step that donates the pool; null-page entries are skipped). kv_fp8: as FP8,
    packed into the row's words, keys first, values after them (pallas_kernels.kv_fp8), so a token's key and
    value may share a page."""
    phases = phases_of(pool.dtype) if kv_fp8 else 1
    words = pool.shape[1] // phases
    # a row in power-of-two column blocks: whole rows up to 4096 wide (as benchmarked), 13B's 5120 in 1024s
    width = power_of_two_block(words, cap=4096)
    kernel = (functools.partial(_write_fp8_kernel, num_pages=num_pages, width=width, phases=phases) if kv_fp8 else
              functools.partial(_write_kernel, num_pages=num_pages, width=width))
    call = pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
                       grid=(k.shape[0], words // width),
                       input_output_aliases={5: 0}, interpret=resolve_interpret(interpret),
                       name="write_kv")
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), k_pages, v_pages, k, v, pool)
