"""MBGMV / MBGMM: multi-adapter LoRA, y += (x @ A[a]) @ B[a], gathering A and B from pool pages.

Tokens come in tiles of `tokens_per_tile` rows that share one adapter:
  - contiguous tiles (tile i = rows [i * tokens_per_tile, (i + 1) * tokens_per_tile)): prefill, a
    request's tokens padded to whole tiles of 16; or one token per tile (the plain MBGMV);
  - gathered tiles (`tile_rows`, built by `tiles_by_adapter`): decode, a batch's rows grouped by adapter
    into tiles of 16 whatever their order, so an adapter's rows are read once per 16 tokens, not once per
    token, and its products are tensor-core dots.
Per tile: its adapter's rank (0 = no adapter: y is passed through) and, per target, page tables
[tiles, chunks, max_rank] of A^T's and B's rows (pallas_kernels.pool). Loops run over rank blocks up to
the tile's own rank: no work, and no reads, for ranks an adapter does not have, beyond one rank block.

Two kernels: shrink (x [N, in] -> v [k_splits, rows, max_rank] float32 partial sums) and expand
(y [N, out] += v @ B, in place). Targets that share an input (q, k, v; gate, up) go through them
together, one launch each for the group: launches, not bytes, dominated LoRA's cost at small batch on
the H100. Splitting shrink's input features over k_splits programs keeps a tile's serial walk short
(decode has few tiles, each a long [tm, 4096] x [4096, r] product).

The kernels live in lora_shrink.py and lora_expand.py (with lora_rows.py, what both do first); this
module joins them (lora_apply_group), builds gathered tiles (tiles_by_adapter) and holds the plain-jnp
references. Their tiling options (what jslora.model.backend.lora_tiling turns on was timed on an H200:
benchmarks/lora_tune.py and benchmarks/gather_probe.py time them, benchmarks/kernel_ir.py shows what each
compiles to for sm_90a) are documented on lora_shrink and lora_expand.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from pallas_kernels.lora_expand import lora_expand
from pallas_kernels.lora_fused import lora_fused_one_row
from pallas_kernels.lora_rows import MANY_ROWS, ONE_ROW
from pallas_kernels.lora_shrink import lora_shrink
from pallas_kernels.pool import TILE

__all__ = ["lora_shrink", "lora_expand", "lora_apply_group", "lora_apply", "tiles_by_adapter", "mbgmv", "mbgmm",
           "lora_apply_reference", "lora_apply_group_reference"]


def lora_apply_group(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, *, num_pages: int,
                     tokens_per_tile: int = 1, rank_block: int = TILE, k_splits: int = 1, split_rows: bool = False,
                     k_block: int = 512, one_row_dot: bool = False, one_row_fma: bool = False,
                     one_row_k_block: int | None = None, stages: int = 2, out_block: int | None = None,
                     out_loop: int = 1, loads_first: bool = False,
                     expand_one_row_dot: bool = False, expand_one_row_fma: bool = False, mask_rank: bool = False,
                     early_pages: bool = False, kind_launches: bool = False, one_row_out_loop: int = 1,
                     fused_one_row: bool = False, fused_block: int = 512, fused_depth: int = 4, fused_warps: int = 4,
                     shrink_warps: int = 4, expand_warps: int = 4, interpret: bool | None = None):
    """ys[t] + (x @ A_t[a]) @ B_t[a] for T targets sharing the input x (q, k, v; or gate, up): two
    launches for the whole group. tile_rank [tiles, T]; a_pages, b_pages: tuples of T per-target tables;
    tile_rows: see lora_shrink; k_splits, split_rows, k_block, one_row_dot, one_row_fma, one_row_k_block,
    stages: lora_shrink's tiling; out_block, out_loop, loads_first, expand_one_row_dot and expand_one_row_fma
    (its one_row_dot and one_row_fma): lora_expand's. The one-row options are apart because they measured
    apart on the H200: the shrink's walk gained from the pipelined dot loop, the expand (no walk at one rank
    block) lost to the 16-row products. mask_rank: both kernels skip the null-page rows of a rank block an
    adapter fills only in part. early_pages: both read their page ids before branching on the tile's rank.
    kind_launches (gathered tiles of several rows): each kernel launches twice, once for the one-row tiles
    and once for the others, each compiled without the other kind's code: a one-row tile's code needs far
    fewer registers and no shared memory for dots, so more programs fit an SM (benchmarks/kernel_ir.py);
    the one-row expand covers one_row_out_loop column blocks a program.
    fused_one_row (where the max rank is one rank block): the one-row tiles' shrink and expand in one
    launch of their own (pallas_kernels.lora_fused, its block, depth and num_warps the fused_ options), the
    other tiles through the two kernels as kind_launches runs them. shrink_warps, expand_warps: the two kernels'
    warps a program."""
    opts = dict(num_pages=num_pages, tokens_per_tile=tokens_per_tile, rank_block=rank_block, split_rows=split_rows,
                mask_rank=mask_rank, early_pages=early_pages, interpret=interpret)
    shrink = functools.partial(lora_shrink, x, pool, layer, tile_rank, jnp.concatenate(a_pages, axis=2), tile_rows,
                               k_splits=k_splits, k_block=k_block, one_row_dot=one_row_dot, one_row_fma=one_row_fma,
                               one_row_k_block=one_row_k_block, stages=stages, num_warps=shrink_warps, **opts)
    expand = functools.partial(lora_expand, pool=pool, layer=layer, tile_rank=tile_rank, b_pages=b_pages,
                               tile_rows=tile_rows, out_block=out_block, loads_first=loads_first,
                               one_row_dot=expand_one_row_dot, one_row_fma=expand_one_row_fma,
                               num_warps=expand_warps, **opts)
    gathered_kinds = tile_rows is not None and tokens_per_tile > 1
    if fused_one_row and a_pages[0].shape[2] == rank_block and (gathered_kinds or tokens_per_tile == 1):
        ys = lora_fused_one_row(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows, num_pages=num_pages,
                                tokens_per_tile=tokens_per_tile, rank_block=rank_block, block=fused_block,
                                depth=fused_depth, num_warps=fused_warps, interpret=interpret)
        if not gathered_kinds:
            return ys
        return expand(shrink(only=MANY_ROWS), ys, out_loop=out_loop, only=MANY_ROWS)
    if not (kind_launches and gathered_kinds):
        return expand(shrink(), ys, out_loop=out_loop)
    v = shrink(v_into=shrink(only=ONE_ROW), only=MANY_ROWS)
    return expand(v, expand(v, ys, out_loop=one_row_out_loop, only=ONE_ROW), out_loop=out_loop, only=MANY_ROWS)


def lora_apply(x, y, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, **opts):
    """y + (x @ A[a]) @ B[a] for every tile (MBGMV when tokens_per_tile == 1, MBGMM otherwise)."""
    (out,) = lora_apply_group(x, (y,), pool, layer, tile_rank[:, None], (a_pages,), (b_pages,), tile_rows, **opts)
    return out


def tiles_by_adapter(row_adapter: np.ndarray, num_tiles: int, tokens_per_tile: int = TILE,
                     none: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by adapter into gathered tiles (host side, numpy).

    row_adapter [N]: each row's adapter (`none` = no LoRA: in no tile). -> (tile_rows [num_tiles,
    tokens_per_tile] int32, tile_adapter [num_tiles], `none` for unused tiles). A tile's spare places
    repeat its first row: the kernels recognise a one-row tile by that, and on the GPU mask the repeats'
    stores. num_tiles >= sum over adapters of ceil(rows / tokens_per_tile); N always suffices."""
    row_adapter = np.asarray(row_adapter)
    tile_rows = np.zeros((num_tiles, tokens_per_tile), np.int32)
    tile_adapter = np.full(num_tiles, none, row_adapter.dtype)
    live = np.flatnonzero(row_adapter != none)
    order = live[np.argsort(row_adapter[live], kind="stable")]  # rows grouped by adapter, in row order
    adapters, starts, counts = np.unique(row_adapter[order], return_index=True, return_counts=True)
    # a few NumPy operations, no loop over adapters: the host builds this every step for ~200 adapters
    group_tiles = -(-counts // tokens_per_tile)
    if group_tiles.sum() > num_tiles:
        raise ValueError(f"{num_tiles} tiles of {tokens_per_tile} rows cannot hold this batch")
    first_tile = np.cumsum(group_tiles) - group_tiles
    group = np.repeat(np.arange(len(adapters)), counts)
    place = np.arange(len(order)) - starts[group]         # the row's place in its adapter's rows
    tile = first_tile[group] + place // tokens_per_tile
    head = place % tokens_per_tile == 0
    tile_rows[tile[head]] = order[head][:, None]             # spare places repeat the tile's first row
    tile_rows[tile, place % tokens_per_tile] = order
    tile_adapter[tile[head]] = adapters[group[head]]
    return tile_rows, tile_adapter


mbgmv = functools.partial(lora_apply, tokens_per_tile=1)
mbgmm = functools.partial(lora_apply, tokens_per_tile=TILE)


def lora_apply_reference(x, y, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, *, num_pages: int,
                         tokens_per_tile: int = 1, **_):
    """Plain jnp: gather each tile's A^T and B rows from the pages, mask ranks, float32 products."""
    in_features, out_features = x.shape[1], y.shape[1]
    tiles = a_pages.shape[0]
    base = layer * num_pages

    def gather(pages, width):  # pages [tiles, chunks, R] -> rows [tiles, R, width]
        rows = pool[base + pages].astype(jnp.float32)            # [tiles, chunks, R, W]
        rows = jnp.moveaxis(rows, 1, 2).reshape(pages.shape[0], pages.shape[2], -1)
        return rows[:, :, :width]

    a_t = gather(a_pages, in_features)                           # [tiles, R, in]
    b = gather(b_pages, out_features)                            # [tiles, R, out]
    live = jnp.arange(a_pages.shape[2])[None, :] < tile_rank[:, None]
    rows = (jnp.arange(tiles * tokens_per_tile).reshape(tiles, tokens_per_tile) if tile_rows is None
            else tile_rows)
    xt = x.astype(jnp.float32)[rows]                             # [tiles, tm, in]
    v = jnp.einsum("tmi,tri->tmr", xt, a_t) * live[:, None, :]
    out = y.astype(jnp.float32)[rows] + jnp.einsum("tmr,tro->tmo", v, b)
    # rows of tiles without this target keep y (their row table may name rows of other tiles)
    rows = jnp.where(tile_rank[:, None] > 0, rows, y.shape[0]).reshape(-1)
    return y.at[rows].set(out.reshape(-1, out_features).astype(y.dtype), mode="drop")


def lora_apply_group_reference(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, **opts):
    """The group, one target at a time through lora_apply_reference."""
    return tuple(lora_apply_reference(x, y, pool, layer, tile_rank[:, t], a_pages[t], b_pages[t], tile_rows, **opts)
                 for t, y in enumerate(ys))
