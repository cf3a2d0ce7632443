"""Experimental: decode LoRA for one-row tiles, packed: P tiles' adapter rows in one block-diagonal product.

When every decode row has its own adapter (S1 at n = 2000), the engine's kernels multiply one row by its
adapter's rank rows per program: a one-row product the tensor cores only take as 16 copies of the row, and
Nsight Compute found the shrink bound by shared-memory traffic, not by HBM (benchmarks/RESULTS.md,
twenty-eighth session). Here a program takes a group of P one-row tiles at once:

  shrink: V [M, C] = X [M, k] @ A^T [k, C], X the group's rows (M = max(16, P); rows past P repeat rows),
          A^T the group's live rank rows packed side by side (C of them a block, tile by tile), and every
          entry whose rank row belongs to another tile than its x row set to zero: block-diagonal. Every row
          fetched is an adapter's real row (no null-page padding, no copies of x), and the product is one
          ordinary tensor-core dot.
  expand: Y [M, bn] += V [M, C] @ B [C, bn], B's rows packed in the same order: again one dense dot.

The packing (which rank rows of which tile go where) is computed by XLA from the page tables before the
kernels; blocks of C rows a group has no live rows for are skipped. The shrink splits the input features
over k_splits programs; their partial sums are added by XLA between the kernels. One chunk only: A and B
rows one pool page wide (Llama-7B's q, k, v, o). Off by default; `benchmarks/gather_probe.py` times it
beside the engine's kernels (probe `groups`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import (
    cdiv,
    contract_last,
    contract_middle,
    div,
    load,
    pallas_call,
    resolve_interpret,
    store_rows,
)

MIN_ROWS = 16  # Triton's smallest dot


def _packed_shrink_kernel(layer_ref, blocks_ref, rows_ref, pages_ref, owner_ref, x_ref, pool_ref, v_ref, *,
                          m, c, bk, steps, groups, max_blocks, num_pages):
    g, tb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t = div(tb, max_blocks)
    b = tb - t * max_blocks
    base = layer_ref[0] * num_pages

    @pl.when(b < blocks_ref[t * groups + g])
    def _():
        rows = rows_ref[pl.ds(g * m, m)]
        packed = pl.ds((t * groups + g) * max_blocks * c + b * c, c)
        pages, owner = pages_ref[packed], owner_ref[packed]
        live = jnp.broadcast_to((owner >= 0)[:, None], (c, bk))

        def step(i, acc):
            k = (split * steps + i) * bk
            a_t = load(pool_ref.at[(base + pages)[:, None], (k + jnp.arange(bk))[None, :]], mask=live, other=0)
            return acc + contract_last(x_ref[rows, pl.ds(k, bk)], a_t)

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((m, c), jnp.float32))
        mine = owner[None, :] == jnp.arange(m)[:, None]  # the block diagonal: x row i with tile i's rank rows
        v_ref[split, pl.ds(g * m, m), pl.ds(tb * c, c)] = jnp.where(mine, acc, 0.0)


def _packed_expand_kernel(layer_ref, blocks_ref, rows_ref, rank_ref, pages_ref, owner_ref, v_ref, pool_ref, *refs,
                          m, p, c, bn, groups, max_blocks, num_pages, interpret):
    num_targets = len(refs) // 2
    y_refs, out_refs = refs[:num_targets], refs[num_targets:]
    g, col = pl.program_id(0), pl.program_id(1) * bn
    base = layer_ref[0] * num_pages
    rows = rows_ref[pl.ds(g * m, m)]
    cols = col + jnp.arange(bn, dtype=jnp.int32)
    for t, (y_ref, out_ref) in enumerate(zip(y_refs, out_refs)):
        blocks = blocks_ref[t * groups + g]

        @pl.when(blocks > 0)  # a group without this target leaves y as it is
        def _(t=t, y_ref=y_ref, out_ref=out_ref, blocks=blocks):
            def block(b, acc):
                packed = pl.ds((t * groups + g) * max_blocks * c + b * c, c)
                live = jnp.broadcast_to((owner_ref[packed] >= 0)[:, None], (c, bn))
                b_rows = load(pool_ref.at[(base + pages_ref[packed])[:, None], cols[None, :]], mask=live, other=0)
                v = v_ref[pl.ds(g * m, m), pl.ds((t * max_blocks + b) * c, c)]
                return acc + contract_middle(v.astype(b_rows.dtype), b_rows)

            acc = jax.lax.fori_loop(0, blocks, block, jnp.zeros((m, bn), jnp.float32))
            out = (y_ref[rows, pl.ds(col, bn)].astype(jnp.float32) + acc).astype(out_ref.dtype)
            writes = rank_ref[pl.ds((t * groups + g) * m, m)] > 0  # rows past P, and unused tiles: no write
            if not interpret:
                store_rows(out_ref, rows, cols, out, writes[:, None])
                return
            # interpret mode's masked scatter writes a masked row's old value back, which would undo a live
            # tile's update of the same row (an unused tile's row table may name it): one row at a time
            for i in range(p):
                @pl.when(writes[i])
                def _(i=i):
                    out_ref[pl.ds(rows[i], 1), pl.ds(col, bn)] = out[i:i + 1]


def packing(tile_rank, page_tables, tile_rows, *, pack: int, row_block: int):
    """The groups' packed rank rows (XLA, from the page tables). tile_rank [tiles, T]; page_tables: T pairs of
    one-chunk tables [tiles, 1, R] (A's, B's); tile_rows [tiles, 1] or None (tile i is row i). -> dict:
    rows [groups * M] (each group's x rows, padded), rank [T * groups * M] (0 where no row is written),
    blocks [T * groups] (blocks of row_block packed rows holding live rows), owner [T, groups, R * P] (the
    group's tile each packed row belongs to, -1 for none) and pages: T pairs of [T, groups, R * P] page ids."""
    tiles, num_targets = tile_rank.shape
    max_rank = page_tables[0][0].shape[2]
    m = max(MIN_ROWS, pack)
    groups = -(-tiles // pack)
    pad = groups * pack - tiles
    if tile_rows is None:
        tile_rows = jnp.arange(tiles, dtype=jnp.int32)[:, None]
    rows = jnp.pad(tile_rows[:, 0].astype(jnp.int32), (0, pad)).reshape(groups, pack)
    rank = jnp.pad(tile_rank.astype(jnp.int32), ((0, pad), (0, 0))).reshape(groups, pack, num_targets)
    live = jnp.arange(max_rank) < rank[..., None]                     # [groups, P, T, R]
    live = jnp.moveaxis(live, 2, 0).reshape(num_targets, groups, pack * max_rank)
    # live rows first, tile by tile (a stable order): a group of rank-8 adapters fills one block of 8 * P rows
    order = jnp.argsort(jnp.logical_not(live), axis=-1, stable=True)
    owner = jnp.where(jnp.take_along_axis(live, order, axis=-1), order // max_rank, -1)

    def packed(tables):  # T tables [tiles, 1, R] -> [T, groups, P * R] in the packed order
        pages = jnp.stack([jnp.pad(tb[:, 0, :], ((0, pad), (0, 0))) for tb in tables]).astype(jnp.int32)
        return jnp.take_along_axis(pages.reshape(num_targets, groups, pack * max_rank), order, axis=-1)

    written = jnp.concatenate([jnp.moveaxis(rank, 2, 0),
                               jnp.zeros((num_targets, groups, m - pack), jnp.int32)], axis=-1)
    return dict(rows=rows[:, jnp.arange(m) % pack].reshape(-1), rank=written.reshape(-1),
                blocks=cdiv(live.sum(-1).astype(jnp.int32), row_block).reshape(-1), owner=owner,
                a_pages=packed([a for a, _ in page_tables]), b_pages=packed([b for _, b in page_tables]))


@functools.partial(jax.jit, static_argnames=("num_pages", "pack", "row_block", "k_splits", "k_block", "out_block",
                                             "stages", "shrink_warps", "expand_warps", "interpret"))
def lora_packed_group(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, *, num_pages: int,
                      pack: int = 16, row_block: int = 128, k_splits: int = 8, k_block: int = 64,
                      out_block: int = 256, stages: int = 2, shrink_warps: int = 4, expand_warps: int = 4,
                      interpret: bool | None = None):
    """ys[t] + (x @ A_t[a]) @ B_t[a] for one-row tiles, pack tiles a program (lora_apply_group's arguments with
    tokens_per_tile = 1 and one-chunk tables [tiles, 1, max_rank]). row_block: packed rank rows a dot takes
    (pack * max_rank must be a multiple); k_splits, k_block: the shrink's input-feature splits and its step;
    out_block: the expand's output columns a program; stages: the shrink's pipeline depth."""
    interpret = resolve_interpret(interpret)
    ys = tuple(ys)
    num_targets, max_rank = len(ys), a_pages[0].shape[2]
    in_features, out_features = x.shape[1], ys[0].shape[1]
    assert all(t.shape[1] == 1 for t in (*a_pages, *b_pages)), "one chunk: rows as wide as a page"
    assert pool.shape[1] == in_features and all(y.shape[1] == pool.shape[1] for y in ys)
    c = min(row_block, pack * max_rank)
    assert (pack * max_rank) % c == 0 and c >= MIN_ROWS
    assert in_features % (k_splits * k_block) == 0 and out_features % out_block == 0
    m, max_blocks = max(MIN_ROWS, pack), pack * max_rank // c
    pk = packing(tile_rank, list(zip(a_pages, b_pages)), tile_rows, pack=pack, row_block=c)
    groups = pk["owner"].shape[1]
    opts = dict(m=m, c=c, groups=groups, max_blocks=max_blocks, num_pages=num_pages)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    owner = pk["owner"].reshape(-1)
    shrink = pallas_call(
        functools.partial(_packed_shrink_kernel, bk=k_block, steps=in_features // (k_splits * k_block), **opts),
        out_shape=jax.ShapeDtypeStruct((k_splits, groups * m, num_targets * max_blocks * c), jnp.float32),
        grid=(groups, num_targets * max_blocks, k_splits), interpret=interpret, num_warps=shrink_warps,
        num_stages=stages, name="lora_packed_shrink")
    v = shrink(layer, pk["blocks"], pk["rows"], pk["a_pages"].reshape(-1), owner, x, pool)
    # blocks without live rows were not written (anything): the expand never reads them
    v = jnp.sum(v, axis=0)
    expand = pallas_call(
        functools.partial(_packed_expand_kernel, p=pack, bn=out_block, interpret=interpret, **opts),
        out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
        grid=(groups, out_features // out_block), interpret=interpret, num_warps=expand_warps,
        input_output_aliases={8 + t: t for t in range(num_targets)}, name="lora_packed_expand")
    return tuple(expand(layer, pk["blocks"], pk["rows"], pk["rank"], pk["b_pages"].reshape(-1), owner, v, pool,
                        *ys))
