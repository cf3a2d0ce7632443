"""What every LoRA kernel program does first: find its tile's rows, and gather an adapter's rows from
the pool's pages (pallas_kernels.lora_shrink, pallas_kernels.lora_expand)."""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import load

ONE_ROW, MANY_ROWS = "one_row", "many_rows"  # tile kinds a launch may be limited to (for_tile's `only`)


def for_tile(rows_ref, tile, tm, body, only: str | None = None):
    """Run body(rows, v_rows, n) on a tile's n rows: `rows` indexes x and y (a slice, or a vector of
    gathered rows), `v_rows` the tile's rows of v. A gathered tile holding one row (its spare places
    repeat it) runs as that one row, without 15 copies: most tiles, when every row has its own adapter.
    only (gathered tiles of several rows): run the tiles of that kind (ONE_ROW or MANY_ROWS) and skip the
    others, so the kernel is compiled without the other kind's code (registers, shared memory)."""
    here = pl.ds(tile * tm, tm)
    if rows_ref is None:
        return body(here, here, tm)
    first = rows_ref[tile * tm]
    if tm == 1:
        return body(pl.ds(first, 1), here, 1)
    single = rows_ref[tile * tm + 1] == first
    if only != MANY_ROWS:
        pl.when(single)(lambda: body(pl.ds(first, 1), pl.ds(tile * tm, 1), 1))
    if only != ONE_ROW:
        pl.when(jnp.logical_not(single))(lambda: body(rows_ref[here], here, tm))


def gather_rows(pool_ref, rows, offset, width, first_rank, rank):
    """Pool rows `rows` (an adapter's rows of A^T or B for ranks first_rank ...), columns offset ...
    offset + width. With rank given, rows at or past it (padding of a rank that is not a multiple of the
    rank block, pointing at the null page) are masked off: zeros, and no memory read."""
    if rank is None:
        return pool_ref[rows, pl.ds(offset, width)]
    live = first_rank + jnp.arange(rows.shape[0]) < rank
    return load(pool_ref.at[rows[:, None], (offset + jnp.arange(width))[None, :]],
                mask=jnp.broadcast_to(live[:, None], (rows.shape[0], width)), other=0)

