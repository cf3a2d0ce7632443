"""The LoRA shrink and expand of a group in one launch (lora_apply_group's `chained`; experimental, untimed).

The two launches cost ~8 µs of device time even for a tiny problem (forty-third session: 32 rows, one adapter,
8.1 µs for 0.9 MB): each kernel's ramp and its chain of dependent loads (rank, page ids, rows) before any bytes
stream. Here the shrink's programs come first in one 1-D grid and the expand's after them. A shrink program
counts itself done in its tile's counter; an expand program issues its own reads of y and B (its first rank
block where it walks several), then waits for its tile's count before it reads v. So the expand's chain
overlaps the shrink's tail, and there is one launch. The wait needs the shrink's programs to be running or done
while expand programs spin: blocks start in the order of their index (as the decoupled look-back of CUB's
single-pass scan assumes), and the shrink's have the lower ones. In interpret mode the programs run one after
another in that order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.lora_expand import expand_config, expand_program
from pallas_kernels.lora_shrink import shrink_config, shrink_program
from pallas_kernels.pool import TILE
from pallas_kernels.triton_compat import atomic_add, debug_barrier, div, pallas_call, rem, resolve_interpret


def _chained_kernel(layer_ref, rank_ref, a_pages_ref, b_pages_ref, *refs, shrink, expand, tiles, num_targets,
                    interpret):
    # refs: [rows,] x, pool, ys in..., counters in, v, ys out..., counters out (ys and counters aliased)
    gathered = shrink["gathered"]
    rows_ref, x_ref, pool_ref = (refs[0], refs[1], refs[2]) if gathered else (None, refs[0], refs[1])
    outputs = refs[len(refs) - num_targets - 2:]
    v_ref, out_refs, done_ref = outputs[0], outputs[1:-1], outputs[-1]
    per_tile = shrink["num_blocks"] * shrink["k_splits"]  # shrink programs a tile
    shrink_programs = tiles * per_tile
    program = pl.program_id(0)

    @pl.when(program < shrink_programs)
    def _():
        tile, rest = rem(program, tiles), div(program, tiles)  # tiles vary fastest, as a 2-D grid's first axis
        b, split = div(rest, shrink["k_splits"]), rem(rest, shrink["k_splits"])
        shrink_program(layer_ref, rank_ref, a_pages_ref, rows_ref, x_ref, pool_ref, v_ref, None, tile, b, split,
                       **shrink)
        # every program of the tile counts, the ones its rank leaves idle too, after its stores (the barrier;
        # the increment releases them to the expand program that acquires the full count)
        debug_barrier(interpret)
        atomic_add(done_ref, tile, jnp.int32(1))

    @pl.when(program >= shrink_programs)
    def _():
        index = program - shrink_programs
        tile, column_group = rem(index, tiles), div(index, tiles)

        def wait_for_v():
            seen = atomic_add(done_ref, tile, jnp.int32(0))  # an acquiring read
            if interpret:  # the tile's shrink programs ran before (interpret mode cannot discharge the loop)
                return
            jax.lax.while_loop(lambda count: count < per_tile,
                               lambda _: atomic_add(done_ref, tile, jnp.int32(0)), seen)

        # y is read through the outputs it aliases (the expand reads and writes the same rows)
        expand_program(layer_ref, rank_ref, b_pages_ref, rows_ref, v_ref, pool_ref, out_refs, out_refs, tile,
                       column_group, wait_for_v=wait_for_v, v_volatile=not interpret, **expand)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "k_splits", "split_rows",
                                             "k_block", "one_row_dot", "one_row_fma", "one_row_k_block", "stages",
                                             "out_block", "out_loop", "loads_first", "expand_one_row_dot",
                                             "expand_one_row_fma", "mask_rank", "early_pages", "num_warps",
                                             "interpret", "with_counts"))
def lora_chained(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, *, num_pages: int,
                 tokens_per_tile: int = 1, rank_block: int = TILE, k_splits: int = 1, split_rows: bool = False,
                 k_block: int = 512, one_row_dot: bool = False, one_row_fma: bool = False,
                 one_row_k_block: int | None = None, stages: int = 2, out_block: int | None = None, out_loop: int = 1,
                 loads_first: bool = False, expand_one_row_dot: bool = False, expand_one_row_fma: bool = False,
                 mask_rank: bool = False, early_pages: bool = False, num_warps: int = 4,
                 interpret: bool | None = None, with_counts: bool = False):
    """ys[t] + (x @ A_t[a]) @ B_t[a] for a group of T targets in one launch: lora_apply_group's operands (a_pages
    the targets' tables concatenated as lora_shrink takes them) and its shrink and expand options; stages and
    num_warps hold for both kinds of program. -> the tuple of updated ys (with_counts: and the tiles' counts of
    finished shrink programs, each tile's rank blocks x k_splits when every one counted)."""
    ys, b_pages = tuple(ys), tuple(b_pages)
    tiles = a_pages.shape[0]
    common = dict(num_pages=num_pages, tokens_per_tile=tokens_per_tile, rank_block=rank_block, split_rows=split_rows,
                  mask_rank=mask_rank, early_pages=early_pages, only=None, interpret=interpret)
    shrink = shrink_config(x, pool, tile_rank, a_pages, tile_rows, k_splits=k_splits, k_block=k_block,
                           one_row_dot=one_row_dot, one_row_fma=one_row_fma, one_row_k_block=one_row_k_block, **common)
    expand = expand_config(ys, pool, b_pages, tile_rows, k_splits=k_splits, one_row_dot=expand_one_row_dot,
                           one_row_fma=expand_one_row_fma, out_block=out_block, out_loop=out_loop,
                           loads_first=loads_first, **common)
    interpret = resolve_interpret(interpret)
    kernel = functools.partial(_chained_kernel, shrink=shrink, expand=expand, tiles=tiles, num_targets=len(ys),
                               interpret=interpret)
    rows = (tile_rows.reshape(-1).astype(jnp.int32),) if tile_rows is not None else ()
    operands = [jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), a_pages.reshape(-1),
                jnp.concatenate(b_pages, axis=1).reshape(-1), *rows, x, pool, *ys, jnp.zeros((tiles,), jnp.int32)]
    first_y = len(operands) - len(ys) - 1
    width = a_pages.shape[2]
    out_shape = (jax.ShapeDtypeStruct((k_splits, tiles * tokens_per_tile, width), jnp.float32),
                 *(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys), jax.ShapeDtypeStruct((tiles,), jnp.int32))
    grid = tiles * (shrink["num_blocks"] * k_splits + expand["group_starts"][-1])
    call = pallas_call(kernel, out_shape=out_shape, grid=(grid,),
                       input_output_aliases={first_y + i: 1 + i for i in range(len(ys) + 1)},
                       interpret=interpret, num_warps=num_warps, num_stages=stages, name="lora_chained")
    out = call(*operands)
    return (tuple(out[1:-1]), out[-1]) if with_counts else tuple(out[1:-1])
