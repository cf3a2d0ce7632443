"""One-row LoRA tiles in one launch: y += (x @ A[a]) @ B[a], the shrink and the expand in the same program.

A decode row whose adapter no other row of the step shares (most rows, when a batch's adapters are many)
forms a one-row tile. lora_shrink and lora_expand spend ~9-10 us a launch above their reads on such tiles
(benchmarks/gather_probe.py, RESULTS.md nineteenth session); here one program per (tile, target) reads
the adapter's A rows, sums v = x A^T in registers, then reads B's rows and adds v B into y: one launch
instead of two, no v round trip through memory, and 3x the programs of a shrink over q, k, v's tiles.

Where the adapters' max rank is one rank block (S1: rank 8 in blocks of 16): a program's rows of A and
B are then one [rank block, columns] block per step, rows past the adapter's rank masked (no read). The
reads are issued `depth` steps ahead of their products by hand, over A's steps and then B's, so the
first B blocks are in flight while v is summed (the walks are unrolled: every step's page and offset is
static). Tiles of several rows go through lora_shrink and lora_expand (pallas_kernels.lora).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.lora_rows import ONE_ROW, for_tile, gather_rows
from pallas_kernels.triton_compat import load, pallas_call, power_of_two_block, resolve_interpret


def _fused_kernel(layer_ref, rank_ref, a_pages_ref, b_pages_ref, *refs, tm, rank_block, block, page_width,
                  num_pages, in_features, outs, a_chunks, b_chunk_starts, depth, rows8, gathered, only):
    num_targets = len(outs)
    rows_ref, x_ref, pool_ref, *y_and_out_refs = refs if gathered else (None, *refs)
    y_refs, out_refs = y_and_out_refs[:num_targets], y_and_out_refs[num_targets:]
    tile, target = pl.program_id(0), pl.program_id(1)
    base = layer_ref[0] * num_pages
    rb = rank_block
    b_chunks = b_chunk_starts[-1]

    for t in range(num_targets):
        @pl.when(target == t)
        def _(t=t):
            rank = rank_ref[tile * num_targets + t]

            def fused(rows, num_rows, ahead):
                # the rank block's first num_rows rows (rows past the rank masked: no read)
                row = rows.start
                live = (jnp.arange(num_rows) < rank)[:, None]

                def a_read(i):
                    chunk, offset = divmod(i * block, page_width)
                    pages = a_pages_ref[pl.ds(((tile * a_chunks + chunk) * num_targets + t) * rb, num_rows)]
                    return gather_rows(pool_ref, base + pages, offset, block, 0, rank)

                def b_read(j):
                    chunk, offset = divmod(j * block, page_width)
                    pages = b_pages_ref[pl.ds((tile * b_chunks + b_chunk_starts[t] + chunk) * rb, num_rows)]
                    return gather_rows(pool_ref, base + pages, offset, block, 0, rank)

                k_steps, n_steps = in_features // block, outs[t] // block
                # one stream of reads, A's steps then B's (with y's block), issued `ahead` steps before use
                reads = [functools.partial(a_read, i) for i in range(k_steps)] + \
                        [functools.partial(lambda j: (b_read(j), y_refs[t][rows, pl.ds(j * block, block)]), j)
                         for j in range(n_steps)]
                issued = [read() for read in reads[:ahead]]
                acc = jnp.zeros((num_rows, block), jnp.float32)
                v = None
                for step in range(len(reads)):
                    if step + ahead < len(reads):
                        issued.append(reads[step + ahead]())
                    data = issued[step]
                    issued[step] = None
                    if step < k_steps:
                        # x's row loaded in A's own layout (num_rows copies, from L1): no layout conversion per step
                        x = load(x_ref.at[jnp.full((num_rows, 1), row), (step * block + jnp.arange(block))[None, :]],
                                 mask=jnp.broadcast_to(live, (num_rows, block)), other=0)
                        acc += data.astype(jnp.float32) * x.astype(jnp.float32)
                        continue
                    if v is None:
                        v = jnp.sum(acc, axis=1, keepdims=True)         # [num_rows, 1], in B's blocks' layout
                    b_rows, y = data
                    j = step - k_steps
                    delta = jnp.sum(b_rows.astype(jnp.float32) * v, axis=0, keepdims=True)
                    out_refs[t][rows, pl.ds(j * block, block)] = (y.astype(jnp.float32) + delta).astype(
                        out_refs[t].dtype)

            def one_row(rows, _v_rows, _n):
                if not rows8 or rb <= 8:
                    return fused(rows, rb, depth)
                # rows8: ranks up to 8 (S1's) read and multiply 8 rows, not the block's 16 with half masked:
                # half the registers a read in flight takes. The kernel's registers are its larger branch's,
                # so the 16-row branch keeps as many bytes in flight: half the steps ahead
                pl.when(rank <= 8)(lambda: fused(rows, 8, depth))
                pl.when(rank > 8)(lambda: fused(rows, rb, max(depth // 2, 1)))

            @pl.when(rank > 0)  # a tile without this target leaves y as it is (out aliases y)
            def _():
                for_tile(rows_ref, tile, tm, one_row, only)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "block", "depth",
                                             "rows8", "num_warps", "interpret"))
def lora_fused_one_row(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, *, num_pages: int,
                       tokens_per_tile: int = 1, rank_block: int = 16, block: int = 512, depth: int = 4,
                       rows8: bool = True, num_warps: int = 4, interpret: bool | None = None):
    """ys[t] + (x @ A_t[a]) @ B_t[a] for the one-row tiles (all tiles when tokens_per_tile == 1; of
    gathered tiles, those whose spare places repeat their first row); other tiles' rows keep y.
    x [N, in]; ys: T arrays [N, out_t], updated in place inside a jitted step that donates them;
    tile_rank [tiles, T]; a_pages: T tables [tiles, chunks_in, rank_block]; b_pages: T tables
    [tiles, chunks_out_t, rank_block] (the adapters' max rank must be one rank block); tile_rows as for
    lora_shrink. block: input features and output columns a step reads (capped to divide them and the
    page width); depth: steps whose reads are in flight ahead of their products; rows8: a tile whose rank
    is at most 8 reads 8 rows a step, not the rank block's; num_warps: Triton's."""
    ys, a_pages, b_pages = tuple(ys), tuple(a_pages), tuple(b_pages)
    tiles, a_chunks, max_rank = a_pages[0].shape
    if max_rank != rank_block:
        raise ValueError(f"lora_fused_one_row needs one rank block: max rank {max_rank}, rank block {rank_block}")
    in_features, page_width = x.shape[1], pool.shape[1]
    outs = tuple(y.shape[1] for y in ys)
    gathered = tile_rows is not None
    if not gathered and tokens_per_tile != 1:
        raise ValueError("lora_fused_one_row takes one-row tiles: gathered tiles, or tokens_per_tile == 1")
    assert gathered or x.shape[0] == tiles
    b_chunk_starts = tuple(int(s) for s in np.cumsum([0] + [p.shape[1] for p in b_pages]))
    kernel = functools.partial(
        _fused_kernel, tm=tokens_per_tile, rank_block=rank_block,
        block=power_of_two_block(in_features, *outs, page_width, cap=block), page_width=page_width,
        num_pages=num_pages, in_features=in_features, outs=outs, a_chunks=a_chunks, b_chunk_starts=b_chunk_starts,
        depth=max(depth, 1), rows8=rows8, gathered=gathered, only=ONE_ROW if gathered and tokens_per_tile > 1 else None)
    rows = (tile_rows.reshape(-1).astype(jnp.int32),) if gathered else ()
    first_y = 6 + len(rows)
    call = pallas_call(kernel, out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
                       grid=(tiles, len(ys)), input_output_aliases={first_y + t: t for t in range(len(ys))},
                       interpret=resolve_interpret(interpret), num_warps=num_warps, name="lora_fused")
    # A's tables side by side per chunk ([tiles, chunks, T, rank]), B's chunks end to end ([tiles, chunks, rank])
    a_table = jnp.stack(a_pages, axis=2).reshape(-1)
    b_table = jnp.concatenate(b_pages, axis=1).reshape(-1)
    return tuple(call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), a_table, b_table, *rows,
                      x, pool, *ys))
