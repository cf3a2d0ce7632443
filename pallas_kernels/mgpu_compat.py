"""What the Mosaic GPU kernels (pallas_kernels.lora_shrink_mgpu, lora_expand_mgpu, and the TMA probe) share:
interpret mode, register loads in one layout, and the one-row tiles' tables."""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def kernel_params(interpret: bool) -> dict:
    """plgpu.kernel's (and pl.core_map's) keyword for Mosaic GPU's interpret mode (which runs on the CPU), or none."""
    if not interpret:
        return {}
    # no public name in jax 0.10 (the CPU's): the private one
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return {"interpret": InterpretGPUParams()}


def strided_reader(shape: tuple[int, ...], vec_size: int, interpret: bool):
    """ref -> its value, loaded in one strided register layout whatever its dtype: left to itself Mosaic GPU
    gives bf16 and float32 different vector widths and will not combine the two. Interpret mode has no
    layouts (nor plgpu.load): a plain read."""
    layout = plgpu.Layout.WG_STRIDED(shape, vec_size=vec_size)

    def read(ref):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    return read


def one_row_tables(tile_rows, page_tables, tiles: int):
    """The LoRA kernels' one-row tiles as the Mosaic GPU kernels read them: (tile_rows [tiles, 1] int32, tile i
    row i where None; pages [tiles, T, max_rank] int32 from T one-chunk tables [tiles, 1, max_rank])."""
    if tile_rows is None:
        tile_rows = jnp.arange(tiles, dtype=jnp.int32)[:, None]
    assert tile_rows.shape == (tiles, 1), "one-row tiles"
    assert all(t.shape[1] == 1 for t in page_tables), "one chunk: rows as wide as a page"
    return tile_rows.astype(jnp.int32), jnp.stack([t[:, 0, :] for t in page_tables], axis=1).astype(jnp.int32)
