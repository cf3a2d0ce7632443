"""Experimental: the decode LoRA shrink on Pallas's Mosaic GPU backend (TMA copies into shared memory).

The Triton shrink (pallas_kernels.lora_shrink) holds few bytes in flight a program: its loads take registers
and its pipeline stages shared memory. Here the bulk copy engine moves each rank row's column blocks into
shared memory through emit_pipeline, `stages` copies in flight, no registers spent on them. One program a
(one-row tile, target); its pipeline walks the tile's rank rows (the adapter's rank, not max_rank: a dynamic trip count)
by column blocks. The products accumulate elementwise in a float32 [max_rank, block_k] buffer in shared
memory, summed across once at the end.

The engine runs it (with lora_expand_mgpu) under the decode tiling option `mgpu` (pallas_kernels.lora);
`benchmarks/tma_gather_probe.py` times it beside the Triton shrink on S1's problem. One-row tiles only
(EngineConfig.decode_lora_tile = 1), one k-split, and A rows as wide as the input (page_width == in_features:
q, k, v, o, gate and up of Llama-7B).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_compat import kernel_params, one_row_tables, strided_reader
from pallas_kernels.triton_compat import resolve_interpret


@functools.partial(jax.jit, static_argnames=("num_pages", "block_k", "stages", "interpret"))
def lora_shrink_mgpu(x, pool, layer, tile_rank, a_pages, tile_rows=None, *, num_pages: int, block_k: int = 256,
                     stages: int = 4, interpret: bool | None = None):
    """v = x @ A[a] per one-row tile, for T targets sharing x [N, in]. tile_rank [tiles, T]; a_pages: a tuple
    of T tables [tiles, 1, max_rank] (pool pages of the rows of A^T, one chunk); tile_rows [tiles, 1]: the row
    of x a tile reads (None: tile i is row i). -> v [1, tiles, T * max_rank] float32, as lora_shrink's
    per-token v with k_splits = 1 (columns past a tile's rank are zero here)."""
    interpret = resolve_interpret(interpret)
    in_features = x.shape[1]
    tiles, num_targets, max_rank = tile_rank.shape[0], len(a_pages), a_pages[0].shape[2]
    tile_rows, pages = one_row_tables(tile_rows, a_pages, tiles)   # pages [tiles, T, max_rank]
    assert pool.shape[1] == in_features, "one chunk: page_width == in"
    assert in_features % block_k == 0 and block_k % 128 == 0
    read = strided_reader((1, block_k), 1, interpret)

    def shrink_mgpu(layer_ref, rank_ref, pages_ref, rows_ref, x_ref, pool_ref, v_ref, acc, v_smem):
        tile, target = jax.lax.axis_index("tile"), jax.lax.axis_index("target")
        base = layer_ref[0] * num_pages
        acc[...] = jnp.zeros((max_rank, block_k), jnp.float32)

        def body(index, a_block, x_block):
            mine = acc.at[pl.ds(index[0], 1)]
            mine[...] = read(mine) + read(a_block).astype(jnp.float32) * read(x_block).astype(jnp.float32)

        plgpu.emit_pipeline(
            body, grid=(rank_ref[tile, target], in_features // block_k),
            in_specs=[plgpu.BlockSpec((1, block_k), lambda r, k: (base + pages_ref[tile, target, r], k)),
                      plgpu.BlockSpec((1, block_k), lambda r, k: (rows_ref[tile, 0], k))],
            max_concurrent_steps=stages)(pool_ref, x_ref)
        for r in range(max_rank):
            v_smem[r] = jnp.sum(read(acc.at[pl.ds(r, 1)]))
        plgpu.commit_smem()  # the sums' stores, before the copy engine reads them
        plgpu.copy_smem_to_gmem(v_smem, v_ref.at[tile, target])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(shrink_mgpu, out_type=jax.ShapeDtypeStruct((tiles, num_targets, max_rank), jnp.float32),
                        scratch_types=[plgpu.SMEM((max_rank, block_k), jnp.float32),
                                       plgpu.SMEM((max_rank,), jnp.float32)],
                        grid=(tiles, num_targets), grid_names=("tile", "target"), **kernel_params(interpret))
    v = call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.astype(jnp.int32), pages, tile_rows, x, pool)
    return v.reshape(1, tiles, num_targets * max_rank)
