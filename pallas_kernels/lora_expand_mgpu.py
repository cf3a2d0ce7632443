"""Experimental: the decode LoRA expand on Pallas's Mosaic GPU backend (TMA copies into shared memory).

The counterpart of pallas_kernels.lora_shrink_mgpu (which says why): one program a (row, target, column
block of the output); its pipeline walks the row's rank rows of B (a dynamic trip count), each a TMA copy of
one block into shared memory, accumulating v[r] * B[r] in float32; then y's block is read, the sum added and
written out. Not wired into the engine: `benchmarks/tma_gather_probe.py` times it. Per-token rows only, one
k-split of v, and B rows as wide as each output (page_width == out_features).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_compat import kernel_params, strided_reader
from pallas_kernels.triton_compat import resolve_interpret


@functools.partial(jax.jit, static_argnames=("num_pages", "block_n", "stages", "interpret"))
def lora_expand_mgpu(v, ys, pool, layer, tile_rank, b_pages, *, num_pages: int, block_n: int = 256,
                     stages: int = 4, interpret: bool | None = None):
    """ys[t] + v_t @ B_t[a] per row. v [1, N, T * max_rank] float32 (lora_shrink's per-token v, one split);
    ys: a tuple of T arrays [N, out]; tile_rank [N, T]; b_pages: a tuple of T tables [N, 1, max_rank].
    -> the tuple of updated ys, new arrays: ys are stacked in and split out (at S1 two copies of 6 MB beside
    B's 47 MB, outside the kernel; a version in the engine would update them in place)."""
    interpret = resolve_interpret(interpret)
    assert v.shape[0] == 1, "one k-split"
    ys, num_targets = tuple(ys), len(b_pages)
    rows, out_features = ys[0].shape
    max_rank = b_pages[0].shape[2]
    assert all(y.shape == (rows, out_features) for y in ys) and pool.shape[1] == out_features
    assert all(t.shape[1] == 1 for t in b_pages) and out_features % block_n == 0 and block_n % 128 == 0
    pages = jnp.stack([t[:, 0, :] for t in b_pages], axis=1)   # [N, T, max_rank]
    read = strided_reader((1, block_n), 1, interpret)

    def expand_mgpu(layer_ref, rank_ref, pages_ref, v_ref, ys_ref, pool_ref, out_ref, acc, y_smem, barrier):
        row, target, col = (jax.lax.axis_index(n) for n in ("row", "target", "col"))
        base = layer_ref[0] * num_pages
        cols = pl.ds(col * block_n, block_n)
        plgpu.copy_gmem_to_smem(ys_ref.at[target, pl.ds(row, 1), cols], y_smem, barrier)
        acc[...] = jnp.zeros((1, block_n), jnp.float32)

        def body(index, b_block):
            r = index[0]
            acc[...] = read(acc) + v_ref[0, row, target * max_rank + r] * read(b_block).astype(jnp.float32)

        plgpu.emit_pipeline(
            body, grid=(rank_ref[row, target],),
            in_specs=[plgpu.BlockSpec((1, block_n), lambda r: (base + pages_ref[row, target, r], col))],
            max_concurrent_steps=stages)(pool_ref)
        plgpu.barrier_wait(barrier)
        y_smem[...] = (read(y_smem).astype(jnp.float32) + read(acc)).astype(y_smem.dtype)
        plgpu.commit_smem()  # the sum's stores, before the copy engine reads them
        plgpu.copy_smem_to_gmem(y_smem, out_ref.at[target, pl.ds(row, 1), cols])
        plgpu.wait_smem_to_gmem(0)

    dtype = ys[0].dtype
    call = plgpu.kernel(expand_mgpu, out_type=jax.ShapeDtypeStruct((num_targets, rows, out_features), dtype),
                        scratch_types=[plgpu.SMEM((1, block_n), jnp.float32), plgpu.SMEM((1, block_n), dtype),
                                       plgpu.Barrier()],
                        grid=(rows, num_targets, out_features // block_n), grid_names=("row", "target", "col"),
                        **kernel_params(interpret))
    out = call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.astype(jnp.int32), pages.astype(jnp.int32),
               v, jnp.stack(ys), pool)
    return tuple(out[t] for t in range(num_targets))

