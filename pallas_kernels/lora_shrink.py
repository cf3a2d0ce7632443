"""The LoRA shrink: v = x @ A[a] per tile of rows sharing an adapter, A's rows gathered from the pool
(pallas_kernels.lora describes the tiles and the tiling options)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.lora_rows import for_tile, gather_rows
from pallas_kernels.pool import TILE
from pallas_kernels.triton_compat import contract_last, div, load, pallas_call, power_of_two_block, resolve_interpret


def _shrink_kernel(layer_ref, rank_ref, pages_ref, *refs, tm, rb, bk, page_width, num_pages, chunks, max_rank,
                   num_targets, total_steps, k_steps, even_splits, gathered, split_rows, one_row_dot, one_row_fma,
                   one_row_k_block, mask_rank, early_pages, only, into):
    # one program per (tile, target, rank block, slice of the input features): a rank-64 token's four
    # blocks run in parallel, so do the targets sharing the input (q, k, v) in one launch, and the
    # K-slices (partial sums, added up by expand) keep each program's serial walk short
    if into:  # v_into's input, aliased to v_ref: the rows this launch leaves are the other launch's
        refs = refs[:-2] + refs[-1:]
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

        def a_block(i):
            """A^T's rows of the block at input features i * bk ... [rb, bk]."""
            chunk = div(i * bk, page_width)
            pages = first_pages if chunks == 1 else \
                pages_ref[pl.ds((tile * chunks + chunk) * num_targets * max_rank + b * rb, rb)]
            return gather_rows(pool_ref, base + pages, i * bk - chunk * page_width, bk, first_rank,
                               rank if mask_rank else None)

        def k_step(i, acc):
            x = x_ref[rows, pl.ds(i * bk, bk)]                     # [n, bk]
            return acc + contract_last(jnp.broadcast_to(x, (acc_rows, bk)), a_block(i))

        def fma_step(i, acc):
            a_t = a_block(i)
            # x's row loaded in a_t's own layout (rb copies, served by L1): against a [1, bk] row Triton
            # converts a_t to the row's layout through shared memory each step (benchmarks/kernel_ir.py;
            # on the H200 that doubled the plain reads' time, gather_probe.py)
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
                acc = jnp.zeros((rows8, width), jnp.float32)
                for i in range(x_ref.shape[1] // width):  # static: each step's page chunk and offset known
                    chunk, offset = divmod(i * width, page_width)
                    pages = pages_ref[pl.ds((tile * chunks + chunk) * num_targets * max_rank + b * rb + h * rows8,
                                            rows8)]
                    a_t = gather_rows(pool_ref, base + pages, offset, width, first_rank + h * rows8, rank)
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
        for_tile(rows_ref, tile, tm, shrink, only)


def _k_steps(in_features: int, page_width: int, k_splits: int, cap: int = 512) -> tuple[int, int, int]:
    """(block of input features, steps in all, steps per split); the last split may be short or empty."""
    bk = power_of_two_block(in_features, page_width, cap=cap)
    steps = in_features // bk
    return bk, steps, -(-steps // k_splits)


@functools.partial(jax.jit, static_argnames=("num_pages", "tokens_per_tile", "rank_block", "k_splits", "split_rows",
                                             "k_block", "one_row_dot", "one_row_fma", "one_row_k_block", "stages",
                                             "mask_rank", "early_pages", "only", "num_warps", "interpret"))
def lora_shrink(x, pool, layer, tile_rank, a_pages, tile_rows=None, v_into=None, *, num_pages: int,
                tokens_per_tile: int = 1,
                rank_block: int = TILE, k_splits: int = 1, split_rows: bool = False, k_block: int = 512,
                one_row_dot: bool = False, one_row_fma: bool = False, one_row_k_block: int | None = None,
                stages: int = 2, mask_rank: bool = False, early_pages: bool = False, only: str | None = None,
                num_warps: int = 4, interpret: bool | None = None):
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
    before the first gather); only (gathered tiles): this launch runs only the tiles of that kind
    (lora_rows.ONE_ROW or MANY_ROWS), writing into v_into (a v from the other kind's launch, updated in
    place) when given. num_warps: Triton's, a program (a one-row tile's 16 x 16 product fills two warps' mma
    tiles: at 4 the dot's layout repeats its rows over two warp pairs; benchmarks/kernel_ir.py)."""
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
        mask_rank=mask_rank, early_pages=early_pages, only=only, into=v_into is not None)
    out_shape = jax.ShapeDtypeStruct((k_splits, tiles * tokens_per_tile, width), jnp.float32)
    rows = (tile_rows.reshape(-1).astype(jnp.int32),) if gathered else ()
    into = () if v_into is None else (v_into,)
    call = pallas_call(kernel, out_shape=out_shape, grid=(tiles, width // rank_block, k_splits),
                       input_output_aliases={5 + len(rows): 0} if into else None,
                       interpret=resolve_interpret(interpret), num_warps=num_warps, num_stages=stages,
                       name="lora_shrink")
    return call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_rank.reshape(-1), a_pages.reshape(-1), *rows, x, pool,
                *into)
