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
Targets that share an input (q, k, v; gate, up) go through them together, one launch each for the
group: launches, not bytes, dominated LoRA's cost at small batch on the H100.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import (cdiv, contract_last, contract_middle, default_interpret, div, pallas_call,
                                          power_of_two_block)


def _shrink_kernel(layer_ref, rank_ref, pages_ref, x_ref, pool_ref, v_ref, *, tm, rb, bk, page_width,
                   num_pages, chunks, max_rank, num_targets, in_features):
    # one program per (tile, target, rank block): a rank-64 token's four blocks run in parallel, and
    # so do the targets sharing the input (q, k, v) in one launch
    tile, b = pl.program_id(0), pl.program_id(1)
    target = div(b, max_rank // rb)
    base = layer_ref[0] * num_pages
    rows = pl.ds(tile * tm, tm)

    @pl.when((b - target * (max_rank // rb)) * rb < rank_ref[tile * num_targets + target])
    def _():
        def k_step(i, acc):
            chunk = div(i * bk, page_width)
            offset = i * bk - chunk * page_width
            pages = pages_ref[pl.ds((tile * chunks + chunk) * num_targets * max_rank + b * rb, rb)]
            a_t = pool_ref[base + pages, pl.ds(offset, bk)]        # [rb, bk] rows of A^T
            x = x_ref[rows, pl.ds(i * bk, bk)]                     # [tm, bk]
            return acc + contract_last(x, a_t)

        acc = jax.lax.fori_loop(0, in_features // bk, k_step, jnp.zeros((tm, rb), jnp.float32))
        v_ref[rows, pl.ds(b * rb, rb)] = acc


def _expand_kernel(layer_ref, rank_ref, pages_ref, v_ref, pool_ref, *y_and_out_refs, tm, rb, bn, page_width,
                   num_pages, chunks, max_rank, block_starts, chunk_starts):
    # one program per (tile, column block of the targets' outputs laid end to end); the target is the
    # segment the block falls in (static boundaries, so each branch has static widths)
    num_targets = len(block_starts) - 1
    y_refs, out_refs = y_and_out_refs[:num_targets], y_and_out_refs[num_targets:]
    tile, n = pl.program_id(0), pl.program_id(1)
    base = layer_ref[0] * num_pages
    rows = pl.ds(tile * tm, tm)

    for t in range(num_targets):
        @pl.when(n >= block_starts[t])
        def _(t=t):
            @pl.when(n < block_starts[t + 1])
            def _():
                col = (n - block_starts[t]) * bn
                chunk = div(col, page_width)
                offset = col - chunk * page_width

                def rank_block(b, acc):
                    pages = pages_ref[pl.ds((tile * chunks + chunk_starts[t] + chunk) * max_rank + b * rb, rb)]
                    b_rows = pool_ref[base + pages, pl.ds(offset, bn)]        # [rb, bn]
                    v = v_ref[rows, pl.ds(t * max_rank + b * rb, rb)]           # [tm, rb]
                    return acc + contract_middle(v.astype(b_rows.dtype), b_rows)

                rank = rank_ref[tile * num_targets + t]
                acc = jax.lax.fori_loop(0, cdiv(rank, rb), rank_block, jnp.zeros((tm, bn), jnp.float32))
                y = y_refs[t][rows, pl.ds(col, bn)]
                out_refs[t][rows, pl.ds(col, bn)] = (y.astype(jnp.float32) + acc).astype(out_refs[t].dtype)


def _interpret(interpret):
    return default_interpret() if interpret is None else interpret


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "interpret"))
def lora_shrink(x, pool, layer, tile_rank, a_pages, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = 16, interpret: bool | None = None):
    """v = x @ A[a] per tile, for T targets sharing the input x [N, in].
    tile_rank [tiles, T] (or [tiles] for T = 1); a_pages [tiles, chunks_in, T * max_rank], the targets'
    tables side by side. -> v [N, T * max_rank] f32, target t in columns t * max_rank ...; columns past a
    tile's rank (rounded up to rank_block) are left unwritten."""
    n_rows, in_features = x.shape
    tiles, chunks, width = a_pages.shape
    num_targets = 1 if tile_rank.ndim == 1 else tile_rank.shape[1]
    max_rank = width // num_targets
    page_width = pool.shape[1]
    assert n_rows == tiles * tokens_per_tile and max_rank % rank_block == 0
    bk = power_of_two_block(in_features, page_width, cap=512)
    kernel = functools.partial(
        _shrink_kernel, tm=tokens_per_tile, rb=rank_block, bk=bk, page_width=page_width, num_pages=num_pages,
        chunks=chunks, max_rank=max_rank, num_targets=num_targets, in_features=in_features)
    call = pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n_rows, width), jnp.float32),
                       grid=(tiles, width // rank_block), interpret=_interpret(interpret), name="lora_shrink")
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), a_pages.reshape(-1), x, pool)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "interpret"))
def lora_expand(v, ys, pool, layer, tile_rank, b_pages, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = 16, interpret: bool | None = None):
    """y_t += v_t @ B_t[a] per tile, for each of T targets (in place inside a jitted step that donates them).
    v [N, T * max_rank] f32 (lora_shrink's); ys: a tuple of T arrays [N, out_t]; tile_rank [tiles, T];
    b_pages: a tuple of T tables [tiles, chunks_out_t, max_rank]. Returns the tuple of updated ys."""
    ys, b_pages = tuple(ys), tuple(b_pages)
    n_rows = ys[0].shape[0]
    tiles, _, max_rank = b_pages[0].shape
    page_width = pool.shape[1]
    outs = [y.shape[1] for y in ys]
    bn = power_of_two_block(*outs, page_width, cap=256 if tokens_per_tile == 1 else 128)
    block_starts = tuple(int(s) for s in np.cumsum([0] + [o // bn for o in outs]))
    chunk_starts = tuple(int(s) for s in np.cumsum([0] + [p.shape[1] for p in b_pages]))
    kernel = functools.partial(
        _expand_kernel, tm=tokens_per_tile, rb=rank_block, bn=bn, page_width=page_width, num_pages=num_pages,
        chunks=chunk_starts[-1], max_rank=max_rank, block_starts=block_starts, chunk_starts=chunk_starts)
    call = pallas_call(kernel, out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
                       grid=(tiles, block_starts[-1]), input_output_aliases={5 + t: t for t in range(len(ys))},
                       interpret=_interpret(interpret), name="lora_expand")
    pages = jnp.concatenate(b_pages, axis=1).reshape(-1)
    return tuple(call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), pages, v, pool, *ys))


def lora_apply_group(x, ys, pool, layer, tile_rank, a_pages, b_pages, *, num_pages: int, tokens_per_tile: int = 1,
                     rank_block: int = 16, interpret: bool | None = None):
    """ys[t] + (x @ A_t[a]) @ B_t[a] for T targets sharing the input x (q, k, v; or gate, up): two
    launches for the whole group. tile_rank [tiles, T]; a_pages, b_pages: tuples of T per-target tables."""
    opts = dict(num_pages=num_pages, tokens_per_tile=tokens_per_tile, rank_block=rank_block, interpret=interpret)
    v = lora_shrink(x, pool, layer, tile_rank, jnp.concatenate(a_pages, axis=2), **opts)
    return lora_expand(v, ys, pool, layer, tile_rank, b_pages, **opts)


def lora_apply(x, y, pool, layer, tile_rank, a_pages, b_pages, **opts):
    """y + (x @ A[a]) @ B[a] for every tile (MBGMV when tokens_per_tile == 1, MBGMM otherwise)."""
    (out,) = lora_apply_group(x, (y,), pool, layer, tile_rank[:, None], (a_pages,), (b_pages,), **opts)
    return out


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


def lora_apply_group_reference(x, ys, pool, layer, tile_rank, a_pages, b_pages, **opts):
    """The group, one target at a time through lora_apply_reference."""
    return tuple(lora_apply_reference(x, y, pool, layer, tile_rank[:, t], a_pages[t], b_pages[t], **opts)
                 for t, y in enumerate(ys))
