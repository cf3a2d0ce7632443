"""MBGMV / MBGMM: multi-adapter LoRA, y += (x @ A[a]) @ B[a], gathering A and B from pool pages.

Tokens come in tiles of `tokens_per_tile` rows that share one adapter (tile i = rows
[i * tokens_per_tile, (i + 1) * tokens_per_tile)):
  - MBGMV (decode): tokens_per_tile = 1, a tile per token, any mix of adapters and ranks;
  - MBGMM (prefill): tokens_per_tile >= 16, a request's tokens padded to whole tiles; the products are
    tensor-core dots.
Per tile: its adapter's rank (0 = no adapter: y is passed through) and, per target, page tables
[tiles, chunks, max_rank] of A^T's and B's rows (pallas_kernels.pool). Loops run over rank blocks up to
the tile's own rank: no work, and no reads, for ranks an adapter does not have, beyond one rank block.

Two kernels: shrink (x [N, in] -> v [N, max_rank] float32) and expand (y [N, out] += v @ B, in place).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import cdiv, contract_last, contract_middle, default_interpret, div, pallas_call


def _block(*divides: int, cap: int) -> int:
    """The largest power of two <= cap dividing every one of `divides`."""
    g = functools.reduce(math.gcd, divides)
    return min(cap, g & -g)


def _shrink_kernel(layer_ref, rank_ref, pages_ref, x_ref, pool_ref, v_ref, *, tm, rb, bk, page_width,
                   num_pages, chunks, max_rank, in_features):
    # one program per (tile, rank block): a rank-64 token's four blocks run in parallel
    tile, b = pl.program_id(0), pl.program_id(1)
    base = layer_ref[0] * num_pages
    rows = pl.ds(tile * tm, tm)

    @pl.when(b * rb < rank_ref[tile])
    def _():
        def k_step(i, acc):
            chunk = div(i * bk, page_width)
            offset = i * bk - chunk * page_width
            pages = pages_ref[pl.ds((tile * chunks + chunk) * max_rank + b * rb, rb)]
            a_t = pool_ref[base + pages, pl.ds(offset, bk)]        # [rb, bk] rows of A^T
            x = x_ref[rows, pl.ds(i * bk, bk)]                     # [tm, bk]
            return acc + contract_last(x, a_t)

        acc = jax.lax.fori_loop(0, in_features // bk, k_step, jnp.zeros((tm, rb), jnp.float32))
        v_ref[rows, pl.ds(b * rb, rb)] = acc


def _expand_kernel(layer_ref, rank_ref, pages_ref, v_ref, pool_ref, y_ref, out_ref, *, tm, rb, bn,
                   page_width, num_pages, chunks, max_rank):
    tile, n = pl.program_id(0), pl.program_id(1)
    base = layer_ref[0] * num_pages
    rows = pl.ds(tile * tm, tm)
    chunk = div(n * bn, page_width)
    offset = n * bn - chunk * page_width

    def rank_block(b, acc):
        pages = pages_ref[pl.ds((tile * chunks + chunk) * max_rank + b * rb, rb)]
        b_rows = pool_ref[base + pages, pl.ds(offset, bn)]        # [rb, bn]
        v = v_ref[rows, pl.ds(b * rb, rb)]                          # [tm, rb]
        return acc + contract_middle(v.astype(b_rows.dtype), b_rows)

    acc = jax.lax.fori_loop(0, cdiv(rank_ref[tile], rb), rank_block, jnp.zeros((tm, bn), jnp.float32))
    y = y_ref[rows, pl.ds(n * bn, bn)]
    out_ref[rows, pl.ds(n * bn, bn)] = (y.astype(jnp.float32) + acc).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "interpret"))
def lora_shrink(x, pool, layer, tile_rank, a_pages, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = 16, interpret: bool | None = None):
    """v = x @ A[a] per tile. x [N, in]; a_pages [tiles, chunks_in, max_rank]; -> v [N, max_rank] f32.
    Columns of v past a tile's rank (rounded up to rank_block) are left unwritten."""
    n_rows, in_features = x.shape
    tiles, chunks, max_rank = a_pages.shape
    page_width = pool.shape[1]
    assert n_rows == tiles * tokens_per_tile and max_rank % rank_block == 0
    bk = _block(in_features, page_width, cap=512)
    kernel = functools.partial(
        _shrink_kernel, tm=tokens_per_tile, rb=rank_block, bk=bk, page_width=page_width, num_pages=num_pages,
        chunks=chunks, max_rank=max_rank, in_features=in_features)
    call = pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n_rows, max_rank), jnp.float32), grid=(tiles, max_rank // rank_block),
                       interpret=default_interpret() if interpret is None else interpret, name="lora_shrink")
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank, a_pages.reshape(-1), x, pool)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "interpret"))
def lora_expand(v, y, pool, layer, tile_rank, b_pages, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = 16, interpret: bool | None = None):
    """y += v @ B[a] per tile (in place inside a jitted step that donates y). v [N, max_rank] f32; y [N, out]; b_pages [tiles, chunks_out, max_rank]."""
    n_rows, out_features = y.shape
    tiles, chunks, max_rank = b_pages.shape
    page_width = pool.shape[1]
    bn = _block(out_features, page_width, cap=256 if tokens_per_tile == 1 else 128)
    kernel = functools.partial(
        _expand_kernel, tm=tokens_per_tile, rb=rank_block, bn=bn, page_width=page_width, num_pages=num_pages,
        chunks=chunks, max_rank=max_rank)
    call = pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
                       grid=(tiles, out_features // bn), input_output_aliases={5: 0},
                       interpret=default_interpret() if interpret is None else interpret, name="lora_expand")
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank, b_pages.reshape(-1), v, pool, y)


def lora_apply(x, y, pool, layer, tile_rank, a_pages, b_pages, *, num_pages: int, tokens_per_tile: int = 1,
               rank_block: int = 16, interpret: bool | None = None):
    """y + (x @ A[a]) @ B[a] for every tile (MBGMV when tokens_per_tile == 1, MBGMM otherwise)."""
    opts = dict(num_pages=num_pages, tokens_per_tile=tokens_per_tile, rank_block=rank_block, interpret=interpret)
    v = lora_shrink(x, pool, layer, tile_rank, a_pages, **opts)
    return lora_expand(v, y, pool, layer, tile_rank, b_pages, **opts)


mbgmv = functools.partial(lora_apply, tokens_per_tile=1)
mbgmm = functools.partial(lora_apply, tokens_per_tile=16)


def lora_apply_reference(x, y, pool, layer, tile_rank, a_pages, b_pages, *, num_pages: int,
                         tokens_per_tile: int = 1, **_):
    """Plain jnp: gather each tile's A^T and B rows from the pages, mask ranks, float32 products."""
    in_features, out_features = x.shape[1], y.shape[1]
    base = layer * num_pages

    def gather(pages, width):  # pages [tiles, chunks, R] -> rows [tiles, R, width]
        rows = pool[base + pages].astype(jnp.float32)            # [tiles, chunks, R, W]
        rows = jnp.moveaxis(rows, 1, 2).reshape(pages.shape[0], pages.shape[2], -1)
        return rows[:, :, :width]

    a_t = gather(a_pages, in_features)                           # [tiles, R, in]
    b = gather(b_pages, out_features)                            # [tiles, R, out]
    live = jnp.arange(a_pages.shape[2])[None, :] < tile_rank[:, None]
    xt = x.astype(jnp.float32).reshape(a_pages.shape[0], tokens_per_tile, in_features)
    v = jnp.einsum("tmi,tri->tmr", xt, a_t) * live[:, None, :]
    delta = jnp.einsum("tmr,tro->tmo", v, b).reshape(y.shape)
    return (y.astype(jnp.float32) + delta).astype(y.dtype)
