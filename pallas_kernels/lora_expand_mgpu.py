"""Experimental: the decode LoRA expand on Pallas's Mosaic GPU backend (TMA copies into shared memory).

The counterpart of pallas_kernels.lora_shrink_mgpu (which says why): one program a (one-row tile, column
block of the output); for each target its pipeline walks the tile's rank rows of B (a dynamic trip count),
each a TMA copy of one block into shared memory, accumulating v[r] * B[r] in float32; then y's block is read,
the sum added and written back in place (a kernel over pl.run_state's refs: plgpu.kernel aliases no inputs).
One-row tiles only (EngineConfig.decode_lora_tile = 1), one k-split of v, and B rows as wide as each output
(page_width == out_features).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_compat import kernel_params, one_row_tables, strided_reader
from pallas_kernels.triton_compat import resolve_interpret


@functools.partial(jax.jit, static_argnames=("num_pages", "block_n", "stages", "interpret"))
def lora_expand_mgpu(v, ys, pool, layer, tile_rank, b_pages, tile_rows=None, *, num_pages: int, block_n: int = 256,
                     stages: int = 4, interpret: bool | None = None):
    """ys[t] + v_t @ B_t[a] for each one-row tile's row. v [1, tiles, T * max_rank] float32 (lora_shrink's
    per-token v, one split); ys: a tuple of T arrays [N, out]; tile_rank [tiles, T] (0: the tile is unused);
    b_pages: a tuple of T tables [tiles, 1, max_rank]; tile_rows [tiles, 1]: the row of y a tile updates
    (None: tile i is row i). -> the tuple of updated ys (in place where the caller donates them)."""
    interpret = resolve_interpret(interpret)
    assert v.shape[0] == 1, "one k-split"
    ys = tuple(ys)
    rows, out_features = ys[0].shape
    tiles, max_rank = tile_rank.shape[0], b_pages[0].shape[2]
    assert all(y.shape == (rows, out_features) for y in ys) and pool.shape[1] == out_features
    assert len(ys) == len(b_pages) and out_features % block_n == 0 and block_n % 128 == 0
    tile_rows, pages = one_row_tables(tile_rows, b_pages, tiles)   # pages [tiles, T, max_rank]
    read = strided_reader((1, block_n), 1, interpret)

    def expand_mgpu(layer_ref, rank_ref, pages_ref, rows_ref, v_ref, pool_ref, ys_ref):
        def program(acc):
            tile, col = jax.lax.axis_index("tile"), jax.lax.axis_index("col")
            base, row = layer_ref[0] * num_pages, rows_ref[tile, 0]
            for target, y_ref in enumerate(ys_ref):
                rank = rank_ref[tile, target]

                @pl.when(rank > 0)  # an unused tile (rank 0) must not write: its row may be another tile's
                def _():
                    acc[...] = jnp.zeros((1, block_n), jnp.float32)

                    def accumulate(index, b_block):
                        r = index[0]
                        acc[...] = read(acc) + v_ref[0, tile, target * max_rank + r] * read(b_block).astype(jnp.float32)

                    plgpu.emit_pipeline(
                        accumulate, grid=(rank,),
                        in_specs=[plgpu.BlockSpec((1, block_n), lambda r: (base + pages_ref[tile, target, r], col))],
                        max_concurrent_steps=stages)(pool_ref)

                    def add(_, y_in, y_new):
                        y_new[...] = (read(y_in).astype(jnp.float32) + read(acc)).astype(y_new.dtype)

                    # y's block in and out through a one-step pipeline: its copies and their waits are the pipeline's
                    block = plgpu.BlockSpec((1, block_n), lambda _: (row, col))
                    plgpu.emit_pipeline(add, grid=(1,), in_specs=[block], out_specs=[block])(y_ref, y_ref)

        # a kernel over the refs of a stateful computation (pl.run_state): the ys are updated where they lie
        @pl.core_map(plgpu.Mesh(grid=(tiles, out_features // block_n), grid_names=("tile", "col")),
                     **kernel_params(interpret))
        def _():
            pl.run_scoped(program, plgpu.SMEM((1, block_n), jnp.float32))

    state = (jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.astype(jnp.int32), pages, tile_rows, v, pool, ys)
    return pl.run_state(lambda refs: expand_mgpu(*refs))(state)[-1]
