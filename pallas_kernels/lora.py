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

Tiling options that are off until timed on a GPU (benchmarks/lora_tune.py sweeps them; benchmarks/
kernel_ir.py shows what each compiles to): one_row_dot (a one-row tile on tensor-core dots, so Triton
pipelines its shrink walk), stages (the shrink's pipeline depth), out_loop and loads_first (fewer expand
programs, each issuing all its reads first).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.pool import TILE
from pallas_kernels.triton_compat import (
    cdiv,
    contract_last,
    contract_middle,
    default_interpret,
    div,
    load,
    pallas_call,
    power_of_two_block,
    store_rows,
)


def _for_tile(rows_ref, tile, tm, body):
    """Run body(rows, v_rows, n) on a tile's n rows: `rows` indexes x and y (a slice, or a vector of
    gathered rows), `v_rows` the tile's rows of v. A gathered tile holding one row (its spare places
    repeat it) runs as that one row, without 15 copies: most tiles, when every row has its own adapter."""
    here = pl.ds(tile * tm, tm)
    if rows_ref is None:
        return body(here, here, tm)
    first = rows_ref[tile * tm]
    if tm == 1:
        return body(pl.ds(first, 1), here, 1)
    single = rows_ref[tile * tm + 1] == first
    pl.when(single)(lambda: body(pl.ds(first, 1), pl.ds(tile * tm, 1), 1))
    pl.when(jnp.logical_not(single))(lambda: body(rows_ref[here], here, tm))


def _shrink_kernel(layer_ref, rank_ref, pages_ref, *refs, tm, rb, bk, page_width, num_pages, chunks, max_rank,
                   num_targets, total_steps, k_steps, even_splits, gathered, split_rows, one_row_dot, one_row_fma,
                   one_row_k_block, mask_rank, early_pages):
    # one program per (tile, target, rank block, slice of the input features): a rank-64 token's four
    # blocks run in parallel, so do the targets sharing the input (q, k, v) in one launch, and the
    # K-slices (partial sums, added up by expand) keep each program's serial walk short
    rows_ref, x_ref, pool_ref, v_ref = refs if gathered else (None, *refs)
    tile, b, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    target = div(b, max_rank // rb)
    base = layer_ref[0] * num_pages
    rank = rank_ref[tile * num_targets + target]
    first_rank = (b - target * (max_rank // rb)) * rb  # the block's first rank

    def block_pages():
        return pages_ref[pl.ds(tile * num_targets * max_rank + b * rb, rb)]

    # early_pages: the block's page ids are read with the tile's rank and rows, before the branch on them,
    # so the walk's first gather waits for one load's latency, not two (an empty tile's table names the
    # null page: a read that is never used, and harmless)
    early = block_pages() if early_pages and chunks == 1 else None

    def shrink(rows, v_rows, n):
        # inputs no wider than a page (q, k, v, o): one chunk, so the block's page ids are read once, before
        # the walk, and each step's gather depends on no load made in that step
        first_pages = (early if early is not None else block_pages()) if chunks == 1 else None

        # one row as TILE copies of itself (one_row_dot): a tensor-core dot, which Triton software-
        # pipelines (the gathers of later steps in flight), where multiply-and-sum is a cross-warp
        # reduction per step with unpipelined loads; the copies' equal rows fold back into one at the end
        acc_rows = TILE if n == 1 and one_row_dot else n

        def k_step(i, acc):
            chunk = div(i * bk, page_width)
            offset = i * bk - chunk * page_width
            pages = first_pages if chunks == 1 else \
                pages_ref[pl.ds((tile * chunks + chunk) * num_targets * max_rank + b * rb, rb)]
            a_t = _gather_rows(pool_ref, base + pages, offset, bk, first_rank, rank if mask_rank else None)
            x = x_ref[rows, pl.ds(i * bk, bk)]                     # [n, bk]
            return acc + contract_last(jnp.broadcast_to(x, (acc_rows, bk)), a_t)

        def fma_step(i, acc):
            chunk = div(i * bk, page_width)
            pages = first_pages if chunks == 1 else \
                pages_ref[pl.ds((tile * chunks + chunk) * num_targets * max_rank + b * rb, rb)]
            a_t = _gather_rows(pool_ref, base + pages, i * bk - chunk * page_width, bk, first_rank,
                               rank if mask_rank else None)
            # x's row loaded in a_t's own layout (rb copies, served by L1): a [1, bk] row broadcast to it
            # would go through shared memory each step (gather_probe.py: twice the plain reads' time)
            live = first_rank + jnp.arange(rb) < rank
            x = load(x_ref.at[jnp.full((rb, 1), rows.start), (i * bk + jnp.arange(bk))[None, :]],
                     mask=jnp.broadcast_to(live[:, None], (rb, bk)), other=0)
            return acc + a_t.astype(jnp.float32) * x.astype(jnp.float32)

        def fma_walk(start, stop, steps):
            # one_row_fma: a one-row tile's products go elementwise into a [rb, bk] float32 accumulator, summed
            # over the input features once at the end: no reduction across warps per step and no 16-row
            # dot. A walk of static length is unrolled so every step's gather can be issued before the first
            # multiply (how gather_probe.py's plain reads reach ~90% of the copy rate)
            acc = jnp.zeros((rb, bk), jnp.float32)
            if steps is None:
                acc = jax.lax.fori_loop(start, stop, fma_step, acc)
            else:
                for j in range(steps):
                    acc = fma_step(start + j, acc)
            return jnp.sum(acc, axis=1)[None, :]

        def wide_walk():
            # one_row_k_block: an unsplit one-row tile walks its input features in steps of one_row_k_block
            # (1024: each warp then holds its own 256 columns of every row, the layout x's [1, 1024] row loads
            # in, so neither x nor the adapter rows change layout) over 8 rows at a time (what rank 8 fills;
            # a block's next 8 rows only where the rank reaches them), into a [8, width] float32 accumulator
            width, rows8 = one_row_k_block, min(rb, 8)

            def part(h):
                live = first_rank + h * rows8 + jnp.arange(rows8) < rank
                acc = jnp.zeros((rows8, width), jnp.float32)
                for i in range(x_ref.shape[1] // width):  # static: each step's page chunk and offset known
                    chunk, offset = divmod(i * width, page_width)
                    pages = pages_ref[pl.ds((tile * chunks + chunk) * num_targets * max_rank + b * rb + h * rows8,
                                            rows8)]
                    a_t = load(pool_ref.at[(base + pages)[:, None], (offset + jnp.arange(width))[None, :]],
                               mask=jnp.broadcast_to(live[:, None], (rows8, width)), other=0)
                    acc += a_t.astype(jnp.float32) * x_ref[rows, pl.ds(i * width, width)].astype(jnp.float32)
                return jnp.sum(acc, axis=1)[None, :]

            for h in range(rb // rows8):
                cols = pl.ds(b * rb + h * rows8, rows8)
                if h == 0:  # a program runs only for blocks that hold at least their first rank
                    v_ref[0, v_rows, cols] = part(0)
                    continue
                reached = first_rank + h * rows8 < rank

                @pl.when(reached)
                def _(h=h, cols=cols):
                    v_ref[0, v_rows, cols] = part(h)

                @pl.when(jnp.logical_not(reached))
                def _(cols=cols):  # zeros, as the other walks' masked rows give (the expand reads them)
                    v_ref[0, v_rows, cols] = jnp.zeros((1, rows8), jnp.float32)

        def walk(start, stop, steps=None):
            if n == 1 and one_row_fma:
                return fma_walk(start, stop, steps)
            acc = jax.lax.fori_loop(start, stop, k_step, jnp.zeros((acc_rows, rb), jnp.float32))
            return jnp.max(acc, axis=0, keepdims=True) if acc_rows != n else acc

        if n == 1 and not split_rows:  # one row, unsplit: split 0 walks every step
            @pl.when(split == 0)
            def _():
                if one_row_fma and one_row_k_block:
                    wide_walk()
                else:
                    v_ref[0, v_rows, pl.ds(b * rb, rb)] = walk(0, total_steps, total_steps)
            return
        stop = jnp.minimum((split + 1) * k_steps, total_steps)
        v_ref[split, v_rows, pl.ds(b * rb, rb)] = walk(split * k_steps, stop, k_steps if even_splits else None)

    @pl.when(first_rank < rank)
    def _():
        _for_tile(rows_ref, tile, tm, shrink)


def _gather_rows(pool_ref, rows, offset, width, first_rank, rank):
    """Pool rows `rows` (an adapter's rows of A^T or B for ranks first_rank ...), columns offset ...
    offset + width. With rank given, rows at or past it (padding of a rank that is not a multiple of the
    rank block, pointing at the null page) are masked off: zeros, and no memory read."""
    if rank is None:
        return pool_ref[rows, pl.ds(offset, width)]
    live = first_rank + jnp.arange(rows.shape[0]) < rank
    return load(pool_ref.at[rows[:, None], (offset + jnp.arange(width))[None, :]],
                mask=jnp.broadcast_to(live[:, None], (rows.shape[0], width)), other=0)


def _expand_kernel(layer_ref, rank_ref, pages_ref, *refs, tm, rb, bn, page_width, num_pages, chunks, max_rank,
                   group_starts, chunk_starts, out_loop, k_splits, gathered, split_rows, one_row_dot, one_row_fma,
                   loads_first, mask_rank, early_pages, interpret):
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
                    return _gather_rows(pool_ref, base + pages, col - div(col, page_width) * page_width, bn,
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
                    _for_tile(rows_ref, tile, tm, expand)


def _interpret(interpret):
    return default_interpret() if interpret is None else interpret


def _k_steps(in_features: int, page_width: int, k_splits: int, cap: int = 512) -> tuple[int, int, int]:
    """(block of input features, steps in all, steps per split); the last split may be short or empty."""
    bk = power_of_two_block(in_features, page_width, cap=cap)
    steps = in_features // bk
    return bk, steps, -(-steps // k_splits)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "k_splits", "split_rows",
                                             "k_block", "one_row_dot", "one_row_fma", "one_row_k_block", "stages",
                                             "mask_rank", "early_pages", "interpret"))
def lora_shrink(x, pool, layer, tile_rank, a_pages, tile_rows=None, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = TILE, k_splits: int = 1, split_rows: bool = False, k_block: int = 512,
                one_row_dot: bool = False, one_row_fma: bool = False, one_row_k_block: int | None = None,
                stages: int = 2, mask_rank: bool = False, early_pages: bool = False, interpret: bool | None = None):
    """v = x @ A[a] per tile, for T targets sharing the input x [N, in].
    tile_rank [tiles, T] (or [tiles] for T = 1); a_pages [tiles, chunks_in, T * max_rank], the targets'
    tables side by side; tile_rows [tiles, tokens_per_tile] the rows of x each tile takes (None: tile i
    is rows i * tokens_per_tile ...). -> v [k_splits, tiles * tokens_per_tile, T * max_rank] f32: partial
    sums over k_splits slices of the input features, row j of tile i at i * tokens_per_tile + j, target t in
    columns t * max_rank ...; columns past a tile's rank (rounded up to rank_block) are left unwritten.
    A gathered tile of one row is split too only with split_rows (else split 0 holds its whole sum, and
    lora_expand must be told the same); k_block caps the input features a program reads per step;
    one_row_dot: a one-row tile multiplies as TILE copies of its row on the tensor cores (else by
    multiply-and-sum); one_row_fma (over one_row_dot): a one-row tile multiplies elementwise into a float32
    [rank block, k block] accumulator, summed once after an unrolled walk; one_row_k_block (with one_row_fma,
    unsplit rows): such a tile's walk in steps of that many input features (capped to divide them and the
    page width), 8 rows at a time; stages: Triton's software
    pipeline depth for the walk over the input features (stages - 1 gathers in flight per program);
    mask_rank: rows of a rank block past the tile's rank are masked off rather than read from the null page
    (a rank-8 adapter's block of 16 reads 8 rows);
    early_pages: a program reads its page ids before it branches on the tile's rank (one latency less
    before the first gather)."""
    in_features = x.shape[1]
    tiles, chunks, width = a_pages.shape
    num_targets = 1 if tile_rank.ndim == 1 else tile_rank.shape[1]
    max_rank = width // num_targets
    page_width = pool.shape[1]
    gathered = tile_rows is not None
    assert gathered or x.shape[0] == tiles * tokens_per_tile
    assert max_rank % rank_block == 0
    bk, total_steps, k_steps = _k_steps(in_features, page_width, k_splits, k_block)
    kernel = functools.partial(
        _shrink_kernel, tm=tokens_per_tile, rb=rank_block, bk=bk, page_width=page_width, num_pages=num_pages,
        chunks=chunks, max_rank=max_rank, num_targets=num_targets, total_steps=total_steps, k_steps=k_steps,
        even_splits=total_steps == k_steps * k_splits,  # every split walks k_steps steps: a static length
        gathered=gathered, split_rows=split_rows, one_row_dot=one_row_dot, one_row_fma=one_row_fma,
        one_row_k_block=one_row_k_block and power_of_two_block(in_features, page_width, cap=one_row_k_block),
        mask_rank=mask_rank, early_pages=early_pages)
    out_shape = jax.ShapeDtypeStruct((k_splits, tiles * tokens_per_tile, width), jnp.float32)
    call = pallas_call(kernel, out_shape=out_shape, grid=(tiles, width // rank_block, k_splits),
                       interpret=_interpret(interpret), num_stages=stages, name="lora_shrink")
    rows = (tile_rows.reshape(-1).astype(jnp.int32),) if gathered else ()
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), a_pages.reshape(-1), *rows, x, pool)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "split_rows", "one_row_dot",
                                             "one_row_fma", "out_block", "out_loop", "loads_first", "mask_rank",
                                             "early_pages", "interpret"))
def lora_expand(v, ys, pool, layer, tile_rank, b_pages, tile_rows=None, *, num_pages: int, tokens_per_tile: int = 1,
                rank_block: int = TILE, split_rows: bool = False, one_row_dot: bool = False, one_row_fma: bool = False,
                out_block: int | None = None, out_loop: int = 1, loads_first: bool = False,
                mask_rank: bool = False, early_pages: bool = False, interpret: bool | None = None):
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
    overlap. mask_rank, early_pages: as lora_shrink's, for B's rows (early_pages with loads_first only).
    Returns the tuple of updated ys."""
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
        interpret=_interpret(interpret))
    rows = (tile_rows.reshape(-1).astype(jnp.int32),) if gathered else ()
    first_y = 5 + len(rows)
    call = pallas_call(kernel, out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
                       grid=(tiles, group_starts[-1]),
                       input_output_aliases={first_y + t: t for t in range(len(ys))},
                       interpret=_interpret(interpret), name="lora_expand")
    pages = jnp.concatenate(b_pages, axis=1).reshape(-1)
    return tuple(call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), pages, *rows, v, pool, *ys))


def lora_apply_group(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows=None, *, num_pages: int,
                     tokens_per_tile: int = 1, rank_block: int = TILE, k_splits: int = 1, split_rows: bool = False,
                     k_block: int = 512, one_row_dot: bool = False, one_row_fma: bool = False,
                     one_row_k_block: int | None = None, stages: int = 2, out_block: int | None = None,
                     out_loop: int = 1, loads_first: bool = False,
                     expand_one_row_dot: bool = False, expand_one_row_fma: bool = False, mask_rank: bool = False,
                     early_pages: bool = False, interpret: bool | None = None):
    """ys[t] + (x @ A_t[a]) @ B_t[a] for T targets sharing the input x (q, k, v; or gate, up): two
    launches for the whole group. tile_rank [tiles, T]; a_pages, b_pages: tuples of T per-target tables;
    tile_rows: see lora_shrink; k_splits, split_rows, k_block, one_row_dot, one_row_fma, one_row_k_block,
    stages: lora_shrink's tiling; out_block, out_loop, loads_first, expand_one_row_dot and expand_one_row_fma
    (its one_row_dot and one_row_fma): lora_expand's. The one-row options are apart because they measured
    apart on the H200: the shrink's walk gained from the pipelined dot loop, the expand (no walk at one rank
    block) lost to the 16-row products. mask_rank: both kernels skip the null-page rows of a rank block an
    adapter fills only in part. early_pages: both read their page ids before branching on the tile's rank."""
    opts = dict(num_pages=num_pages, tokens_per_tile=tokens_per_tile, rank_block=rank_block, split_rows=split_rows,
                mask_rank=mask_rank, early_pages=early_pages, interpret=interpret)
    v = lora_shrink(x, pool, layer, tile_rank, jnp.concatenate(a_pages, axis=2), tile_rows, k_splits=k_splits,
                    k_block=k_block, one_row_dot=one_row_dot, one_row_fma=one_row_fma, one_row_k_block=one_row_k_block,
                    stages=stages, **opts)
    return lora_expand(v, ys, pool, layer, tile_rank, b_pages, tile_rows, out_block=out_block, out_loop=out_loop,
                       loads_first=loads_first, one_row_dot=expand_one_row_dot, one_row_fma=expand_one_row_fma,
                       **opts)


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
