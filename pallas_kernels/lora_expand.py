"""The LoRA expand: y += v @ B[a] per tile of rows sharing an adapter, in place, B's rows gathered from
the pool (pallas_kernels.lora describes the tiles and the tiling options)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.lora_rows import for_tile, gather_rows
from pallas_kernels.pool import TILE
from pallas_kernels.triton_compat import (
    cdiv,
    contract_middle,
    div,
    load,
    pallas_call,
    power_of_two_block,
    resolve_interpret,
    store_rows,
)


def _expand_kernel(layer_ref, rank_ref, pages_ref, *refs, tm, rb, bn, page_width, num_pages, chunks, max_rank,
                   group_starts, chunk_starts, out_loop, k_splits, gathered, split_rows, one_row_dot, one_row_fma,
                   loads_first, mask_rank, early_pages, only, interpret):
    # one program per (tile, group of out_loop column blocks of the targets' outputs laid end to end); the
    # target is the segment the group falls in (static boundaries, so each branch has static widths)
    num_targets = len(group_starts) - 1
    rows_ref, v_ref, pool_ref, *y_and_out_refs = refs if gathered else (None, *refs)
    y_refs, out_refs = y_and_out_refs[:num_targets], y_and_out_refs[num_targets:]
    tile, n = pl.program_id(0), pl.program_id(1)
    base = layer_ref[0] * num_pages

    for t in range(num_targets):
        @pl.when(n >= group_starts[t])
        def _(t=t):
            @pl.when(n < group_starts[t + 1])
            def _():
                first = (n - group_starts[t]) * out_loop
                rank = rank_ref[tile * num_targets + t]
                y_ref, out_ref = y_refs[t], out_refs[t]

                def tile_v(v_rows, m, b):
                    """The tile's v at rank block b [m, rb], the shrink's k-splits added up."""
                    cols = pl.ds(t * max_rank + b * rb, rb)
                    v = v_ref[0, v_rows, cols]
                    for split in range(1, k_splits if m > 1 or split_rows else 1):  # unsplit row: split 0
                        v += v_ref[split, v_rows, cols]
                    return v

                def row_v(v_rows, b):
                    """A one-row tile's v at rank block b as a column [rb, 1] (one_row_fma): its products
                    with B [rb, bn] broadcast it along B's own layout, where the [1, rb] of tile_v times B
                    went through shared memory a block at a time, B and all (benchmarks/kernel_ir.py)."""
                    ranks = (t * max_rank + b * rb + jnp.arange(rb))[:, None]
                    live = (b * rb + jnp.arange(rb) < rank)[:, None]
                    row = jnp.full((rb, 1), v_rows.start)
                    v = load(v_ref.at[0, row, ranks], mask=live, other=0)
                    for split in range(1, k_splits if split_rows else 1):
                        v += load(v_ref.at[split, row, ranks], mask=live, other=0)
                    return v

                def block_pages(col, b):
                    chunk = div(col, page_width)
                    return pages_ref[pl.ds((tile * chunks + chunk_starts[t] + chunk) * max_rank + b * rb, rb)]

                def b_block(col, b, pages=None):
                    """B's rows of rank block b at output columns col ... col + bn [rb, bn]."""
                    pages = block_pages(col, b) if pages is None else pages
                    return gather_rows(pool_ref, base + pages, col - div(col, page_width) * page_width, bn,
                                        b * rb, rank if mask_rank else None)

                def acc_rows(m):
                    # one row as TILE copies (one_row_dot): a tensor-core dot instead of a reduction; the
                    # equal rows fold back into one in store
                    return TILE if m == 1 and one_row_dot else m

                def times_b(v, b_rows, m):
                    if m == 1 and one_row_fma:  # v from row_v
                        return jnp.sum(b_rows.astype(jnp.float32) * v, axis=0, keepdims=True)
                    return contract_middle(jnp.broadcast_to(v.astype(b_rows.dtype), (acc_rows(m), rb)), b_rows)

                def block_v(v_rows, m, b):
                    return row_v(v_rows, b) if m == 1 and one_row_fma else tile_v(v_rows, m, b)

                def store(rows, m, col, y, acc):
                    if acc.shape[0] != m:
                        acc = jnp.max(acc, axis=0, keepdims=True)
                    out = (y.astype(jnp.float32) + acc).astype(out_ref.dtype)
                    if isinstance(rows, pl.Slice):
                        out_ref[rows, pl.ds(col, bn)] = out
                        return
                    # a tile's spare places repeat its first row and compute the same values, so the
                    # repeated stores agree; on the GPU a mask skips them (interpret mode's scatter
                    # would let a masked duplicate write the old value back)
                    spare = (jnp.arange(m) > 0) & (rows == rows_ref[tile * tm])
                    store_rows(out_ref, rows, col + jnp.arange(bn, dtype=jnp.int32), out,
                               None if interpret else jnp.logical_not(spare)[:, None])

                cols = [(first + j) * bn for j in range(out_loop)]  # unrolled: independent blocks
                # early_pages (one rank block): every block's page ids read with the tile's rank, before the
                # branch on it, as the shrink's
                early = [block_pages(col, 0) for col in cols] if early_pages and loads_first else [None] * len(cols)

                def expand(rows, v_rows, m):
                    if loads_first:  # one rank block: every block's reads are issued before any product
                        v = block_v(v_rows, m, 0)
                        loaded = [(b_block(col, 0, pages), y_ref[rows, pl.ds(col, bn)])
                                  for col, pages in zip(cols, early)]
                        for col, (b_rows, y) in zip(cols, loaded):
                            store(rows, m, col, y, times_b(v, b_rows, m))
                        return
                    for col in cols:
                        y = y_ref[rows, pl.ds(col, bn)]  # before the walk: its latency overlaps the page reads
                        acc = jax.lax.fori_loop(
                            0, cdiv(rank, rb), lambda b, acc, col=col: acc + times_b(block_v(v_rows, m, b),
                                                                                      b_block(col, b), m),
                            jnp.zeros((1 if m == 1 and one_row_fma else acc_rows(m), bn), jnp.float32))
                        store(rows, m, col, y, acc)

                # a tile without this target leaves y as it is (out aliases y): no reads, no writes; an
                # empty gathered tile's row table may name any row
                @pl.when(rank > 0)
                def _():
                    for_tile(rows_ref, tile, tm, expand, only)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "split_rows", "one_row_dot",
                                             "one_row_fma", "out_block", "out_loop", "loads_first", "mask_rank",
                                             "early_pages", "only", "num_warps", "interpret"))
def lora_expand(v, ys, pool, layer, tile_rank, b_pages, tile_rows=None, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = TILE, split_rows: bool = False, one_row_dot: bool = False, one_row_fma: bool = False,
                out_block: int | None = None, out_loop: int = 1, loads_first: bool = False,
                mask_rank: bool = False, early_pages: bool = False, only: str | None = None, num_warps: int = 4,
                interpret: bool | None = None):
    """y_t += v_t @ B_t[a] per tile, for each of T targets (in place inside a jitted step that donates them).
    v [k_splits, tiles * tokens_per_tile, T * max_rank] f32 (lora_shrink's partial sums, added up here);
    ys: a tuple of T arrays [N, out_t]; tile_rank [tiles, T]; b_pages: a tuple of T tables
    [tiles, chunks_out_t, max_rank]; tile_rows as for lora_shrink (rows no live tile names keep y).
    split_rows as given to lora_shrink; one_row_dot: as lora_shrink's, for the products with B; one_row_fma
    (over one_row_dot): a one-row tile's v is read in B's layout and its products summed over the ranks
    without a layout conversion; out_block
    caps the output columns a program writes (default 256 for one-row tiles, 128 for tiles of several) and
    out_loop how many such blocks one program walks (at most; the largest power of two that divides every
    target's blocks): fewer, longer programs. loads_first: where max_rank is one rank block (no walk over
    ranks), a program issues all its blocks' reads (B's rows, y) before any product, so their latencies
    overlap. mask_rank, early_pages: as lora_shrink's, for B's rows (early_pages with loads_first only);
    only: as lora_shrink's (the other kind's tiles keep y); num_warps: Triton's, a program. Returns the tuple of
    updated ys."""
    ys, b_pages = tuple(ys), tuple(b_pages)
    tiles, _, max_rank = b_pages[0].shape
    page_width = pool.shape[1]
    gathered = tile_rows is not None
    outs = [y.shape[1] for y in ys]
    bn = power_of_two_block(*outs, page_width, cap=out_block or (256 if tokens_per_tile == 1 else 128))
    blocks = [o // bn for o in outs]
    out_loop = power_of_two_block(*blocks, cap=out_loop)
    group_starts = tuple(int(s) for s in np.cumsum([0] + [b // out_loop for b in blocks]))
    chunk_starts = tuple(int(s) for s in np.cumsum([0] + [p.shape[1] for p in b_pages]))
    kernel = functools.partial(
        _expand_kernel, tm=tokens_per_tile, rb=rank_block, bn=bn, page_width=page_width, num_pages=num_pages,
        chunks=chunk_starts[-1], max_rank=max_rank, group_starts=group_starts, chunk_starts=chunk_starts,
        out_loop=out_loop,
        k_splits=v.shape[0], gathered=gathered, split_rows=split_rows, one_row_dot=one_row_dot, one_row_fma=one_row_fma,
        loads_first=loads_first and max_rank == rank_block, mask_rank=mask_rank, early_pages=early_pages,
        only=only, interpret=resolve_interpret(interpret))
    rows = (tile_rows.reshape(-1).astype(jnp.int32),) if gathered else ()
    first_y = 5 + len(rows)
    call = pallas_call(kernel, out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
                       grid=(tiles, group_starts[-1]),
                       input_output_aliases={first_y + t: t for t in range(len(ys))},
                       interpret=resolve_interpret(interpret), num_warps=num_warps, name="lora_expand")
    pages = jnp.concatenate(b_pages, axis=1).reshape(-1)
    return tuple(call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), pages, *rows, v, pool, *ys))
