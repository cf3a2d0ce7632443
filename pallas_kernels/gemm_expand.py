"""A projection whose epilogue adds each row's LoRA expand: y = x @ W + v @ B[a(row)], B's rows gathered from
the pool (pallas_kernels.pool), for the targets of a fused projection laid end to end (q, k, v).

Why: at serving batches (a few hundred rows) a projection is compute-bound, the tensor cores busy and HBM at
about a third of its rate, while the LoRA expand (rank x out values a row, most rows with an adapter of their
own) is pure bandwidth: apart it is a launch of its own that reads y, B and v and writes y again. Inside the
GEMM's programs B's rows are read while the tensor cores work, and y is written once.

Program (i, j) owns rows i * bm ... and output columns j * bn ... (bn divides every target's width, so a block
lies in one target), walks K in bk steps on tensor-core dots, then for each rank r below the largest of its rows'
ranks adds v[row, r] * B[a(row)][r, columns] (a row past its own rank reads nothing: masked). Per row: its rank
per target (`row_rank` [M, T], 0 = no adapter), and B's page table (`b_pages` [M, chunks, max_rank], the targets'
chunks side by side, as lora_expand's tables are joined); v [M, T * max_rank] float32 is the shrink's output by
row, its k-splits summed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import div, dot, load, pallas_call, resolve_interpret


def _column_target(col, bounds, chunk_starts):
    """(target, its first column, its first chunk in the page tables) for output column col: static
    bounds, a traced column."""
    target, start, chunk = jnp.int32(0), jnp.int32(0), jnp.int32(0)
    for t in range(1, len(bounds) - 1):
        past = col >= bounds[t]
        target = jnp.where(past, t, target)
        start = jnp.where(past, bounds[t], start)
        chunk = jnp.where(past, chunk_starts[t], chunk)
    return target, start, chunk


def _kernel(layer_ref, rank_ref, pages_ref, x_ref, w_ref, v_ref, pool_ref, y_ref, *, bm, bn, bk, k_steps, bounds,
            chunk_starts, page_width, num_pages, max_rank, lora):
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def k_step(s, acc):
        return acc + dot(x_ref[rows, pl.ds(s * bk, bk)], w_ref[pl.ds(s * bk, bk), cols])

    acc = jax.lax.fori_loop(0, k_steps, k_step, jnp.zeros((bm, bn), jnp.float32))
    if lora:
        num_targets, chunks = len(bounds) - 1, chunk_starts[-1]
        target, start, first_chunk = _column_target(j * bn, bounds, chunk_starts)
        col = j * bn - start                          # the block's first column within its target
        chunk = div(col, page_width)
        offset = col - chunk * page_width
        row_ids = i * bm + jnp.arange(bm)
        rank = rank_ref[row_ids * num_targets + target]                       # [bm]
        table = (row_ids * chunks + first_chunk + chunk) * max_rank           # each row's B pages, this chunk
        v_row = row_ids * (num_targets * max_rank) + target * max_rank
        base = layer_ref[0] * num_pages

        def rank_step(r, acc):
            live = r < rank
            pages = load(pages_ref.at[table + r], mask=live, other=0)
            b = load(pool_ref.at[(base + pages)[:, None], (offset + jnp.arange(bn))[None, :]],
                     mask=jnp.broadcast_to(live[:, None], (bm, bn)), other=0)
            v = load(v_ref.at[v_row + r], mask=live, other=0)
            return acc + v[:, None] * b.astype(jnp.float32)

        acc = jax.lax.fori_loop(0, jnp.max(rank), rank_step, acc)
    y_ref[rows, cols] = acc.astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("widths", "num_pages", "block_m", "block_n", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def gemm_expand(x, w, v, pool, layer, row_rank, b_pages, *, widths: tuple[int, ...], num_pages: int,
                block_m: int = 128, block_n: int = 128, block_k: int = 64, num_warps: int = 8, num_stages: int = 3,
                interpret: bool | None = None):
    """y [M, N] = x [M, K] @ w [K, N] + each row's v @ B per target. widths: the targets' output widths
    (summing to N); v [M, T * max_rank] float32 (None: the plain GEMM, no LoRA); row_rank [M, T] int32;
    b_pages [M, chunks, max_rank] int32 (pages of B's rows, each target's chunks of page_width columns in
    turn). block_m must divide M, block_n every width and the page width, block_k K."""
    m, k = x.shape
    n = w.shape[1]
    assert sum(widths) == n and m % block_m == 0 and k % block_k == 0, (x.shape, w.shape, widths)
    assert all(width % block_n == 0 for width in widths) and pool.shape[1] % block_n == 0
    lora = v is not None
    page_width = pool.shape[1]
    bounds = tuple(int(b) for b in np.cumsum((0,) + tuple(widths)))
    chunk_starts = tuple(int(c) for c in np.cumsum((0,) + tuple(-(-width // page_width) for width in widths)))
    max_rank = b_pages.shape[2] if lora else 1
    if not lora:  # placeholders the kernel never reads
        v = jnp.zeros((1, 1), jnp.float32)
        row_rank = jnp.zeros((1,), jnp.int32)
        b_pages = jnp.zeros((1, 1, 1), jnp.int32)
    kernel = functools.partial(_kernel, bm=block_m, bn=block_n, bk=block_k, k_steps=k // block_k, bounds=bounds,
                               chunk_starts=chunk_starts, page_width=page_width, num_pages=num_pages,
                               max_rank=max_rank, lora=lora)
    call = pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(m // block_m, n // block_n),
                       interpret=resolve_interpret(interpret), num_warps=num_warps, num_stages=num_stages,
                       name="gemm_expand")
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), row_rank.reshape(-1).astype(jnp.int32),
                b_pages.reshape(-1).astype(jnp.int32), x, w, v.reshape(-1), pool)


def gemm_expand_reference(x, w, v, pool, layer, row_rank, b_pages, *, widths: tuple[int, ...], num_pages: int):
    """Plain jnp in float32: x @ w, plus each row's v @ B gathered from the pages, ranks masked."""
    y = x.astype(jnp.float32) @ w.astype(jnp.float32)
    if v is None:
        return y
    page_width, max_rank = pool.shape[1], b_pages.shape[2]
    rows = pool[layer * num_pages + b_pages].astype(jnp.float32)     # [M, chunks, R, W]
    parts, chunk0 = [], 0
    for t, width in enumerate(widths):
        chunks = -(-width // page_width)
        b = jnp.moveaxis(rows[:, chunk0:chunk0 + chunks], 1, 2).reshape(x.shape[0], max_rank, -1)[:, :, :width]
        live = jnp.arange(max_rank)[None, :] < row_rank[:, t:t + 1]
        vt = v[:, t * max_rank:(t + 1) * max_rank] * live
        parts.append(jnp.einsum("mr,mrw->mw", vt, b))
        chunk0 += chunks
    return y + jnp.concatenate(parts, axis=1)


def v_by_row(v, tile_rows, tile_rank, num_rows: int):
    """lora_shrink's output over gathered tiles (v [k_splits, tiles * tm, T * max_rank], tile_rows [tiles, tm],
    tile_rank [tiles, T]) -> [num_rows, T * max_rank] by row, the splits summed. A one-row tile's sum is all in
    split 0 (its other splits and spare places are never written: not read here), an empty tile names no row."""
    tiles, tm = tile_rows.shape
    per_place = v.reshape(v.shape[0], tiles, tm, -1)
    one_row = tile_rows[:, 1] == tile_rows[:, 0] if tm > 1 else jnp.ones((tiles,), bool)
    summed = jnp.where(one_row[:, None, None], per_place[0], per_place.sum(axis=0))
    place = jnp.arange(tm)[None, :]
    valid = ((place == 0) | (tile_rows != tile_rows[:, :1])) & (tile_rank.reshape(tiles, -1).max(axis=1) > 0)[:, None]
    index = jnp.where(valid, tile_rows, num_rows).reshape(-1)
    out = jnp.zeros((num_rows, summed.shape[-1]), jnp.float32)
    return out.at[index].set(summed.reshape(tiles * tm, -1), mode="drop")
