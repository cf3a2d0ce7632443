"""MBGMV / MBGMM in interpret mode against the Foundation's reference LoRA (jslora.model.lora)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jslora.model.lora import lora_delta
from pallas_kernels.lora import lora_apply, lora_apply_reference, tiles_by_adapter
from pallas_kernels.problems import gathered_tiles, lora_problem

BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def run_and_check(p, dtype, tokens_per_tile, **tiling):
    args = [jnp.asarray(p[k]) for k in ("layer", "tile_rank", "a_pages", "b_pages")]
    x, y, pool = (jnp.asarray(p[k], dtype) for k in ("x", "y", "pool"))
    oracle = (np.asarray(y, np.float64) + np.asarray(
        lora_delta(jnp.asarray(x, jnp.float32), jnp.asarray(p["dense_a"]), jnp.asarray(p["dense_b"]),
                   jnp.asarray(p["row_ids"])), np.float64))
    ours = lora_apply(x, y, pool, *args, num_pages=p["num_pages"], tokens_per_tile=tokens_per_tile, interpret=True,
                      **tiling)
    ref = lora_apply_reference(x, y, pool, *args, num_pages=p["num_pages"], tokens_per_tile=tokens_per_tile)
    ours = np.asarray(ours, np.float64)
    assert np.isfinite(ours).all()
    # y changes for adapter rows only, so compare deltas: the part the kernel computes
    base = np.asarray(y, np.float64)
    # The sum y + delta is rounded to `dtype` once more, which costs up to half an ulp of |y + delta|
    # whatever the kernel does: allow that on top of the bound on the delta itself.
    output_rounding = np.linalg.norm(oracle) * float(jnp.finfo(dtype).eps)
    allowed = BOUND[dtype] * np.linalg.norm(oracle - base) + output_rounding
    for out in (ours, np.asarray(ref, np.float64)):
        assert np.linalg.norm(out - oracle) <= allowed
    untouched = p["row_ids"] < 0
    np.testing.assert_array_equal(ours[untouched], base[untouched])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(page_width=64, in_features=64, out_features=64),     # MHA attention projection
    dict(page_width=32, in_features=128, out_features=32),    # GQA k/v: a row of A spans 4 pages
    dict(page_width=64, in_features=160, out_features=64),    # MLP down: I not a multiple of the page
    dict(page_width=64, in_features=64, out_features=160),    # MLP gate/up
])
def test_mbgmv_mixed_ranks(rng, dtype, shape):
    ranks = [1, 8, 16, 33, 64, 128, 5]
    batch = int(rng.choice([1, 7, 13]))
    tiles = [None if rng.random() < 0.2 else int(rng.integers(len(ranks))) for _ in range(batch)]
    p = lora_problem(rng, num_layers=3, adapter_ranks=ranks, tile_adapters=tiles, **shape)
    run_and_check(p, dtype, tokens_per_tile=1)
    # each token's row as 16 copies on tensor-core dots (one_row_dot): the same products; and the rows of
    # a partly filled rank block (ranks 1, 5, 8, 33) masked off instead of read from the null page
    run_and_check(p, dtype, tokens_per_tile=1, one_row_dot=True, stages=3, expand_one_row_dot=True)
    run_and_check(p, dtype, tokens_per_tile=1, k_splits=2, one_row_dot=True, mask_rank=True)
    # one-row products elementwise into a [rank block, k block] accumulator, summed once (one_row_fma)
    run_and_check(p, dtype, tokens_per_tile=1, k_splits=2, split_rows=True, one_row_fma=True, mask_rank=True,
                  expand_one_row_fma=True)
    run_and_check(p, dtype, tokens_per_tile=1, k_splits=2, one_row_fma=True, expand_one_row_fma=True,
                  out_block=32, out_loop=2, loads_first=True)
    # ... walked in wider steps 8 rows at a time (one_row_k_block; GQA k/v's rows span pages: capped to one)
    run_and_check(p, dtype, tokens_per_tile=1, k_splits=2, one_row_fma=True, one_row_k_block=64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens_per_tile", [4, 16])  # 4: decode tokens sorted by adapter; 16: prefill, dots
def test_mbgmm_segments(rng, dtype, tokens_per_tile):
    ranks = [4, 16, 64, 128, 24]
    tiles = [0, 0, None, 3, 1, 1, 1, 4, 2]  # a request's tokens span several tiles of 16 rows
    p = lora_problem(rng, num_layers=2, page_width=64, in_features=160, out_features=64,
                     adapter_ranks=ranks, tile_adapters=tiles, tokens_per_tile=tokens_per_tile)
    run_and_check(p, dtype, tokens_per_tile=tokens_per_tile)


def test_single_token_no_adapter(rng):
    p = lora_problem(rng, num_layers=1, page_width=32, in_features=32, out_features=32,
                     adapter_ranks=[8], tile_adapters=[None])
    out = lora_apply(*(jnp.asarray(p[k]) for k in ("x", "y", "pool", "layer", "tile_rank", "a_pages", "b_pages")),
                     num_pages=p["num_pages"], interpret=True)
    np.testing.assert_array_equal(np.asarray(out), p["y"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens_per_tile", [1, 16])
@pytest.mark.parametrize("out_features", [
    [128, 32, 32],     # GQA q, k, v (page width = k/v width)
    [160, 160],        # gate, up: I not a multiple of the page
])
@pytest.mark.parametrize("out_loop", [1, 4])  # 4: 2 for q, k, v (32 = 2 blocks of 16), 2 for gate, up (160 = 10 x 16)
@pytest.mark.parametrize("max_rank", [None, 16])  # 16: one rank block, so loads_first reads every block first
def test_group_of_targets(rng, dtype, tokens_per_tile, out_features, out_loop, max_rank):
    """q, k, v (or gate, up) in one shrink and one expand launch, ranks differing per target and a
    target some adapters leave out, equal the per-target oracle."""
    from pallas_kernels.lora import lora_apply_group, lora_apply_group_reference
    from pallas_kernels.problems import lora_group_problem

    num_targets = len(out_features)
    choices = [0, 1, 8, 16, 33, 64] if max_rank is None else [0, 1, 8, 16]
    adapter_ranks = [[int(rng.choice(choices)) for _ in range(num_targets)] for _ in range(4)]
    adapter_ranks[0] = [16] * num_targets
    tiles = [None if rng.random() < 0.2 else int(rng.integers(4)) for _ in range(int(rng.choice([1, 5, 9])))]
    p = lora_group_problem(rng, num_layers=2, page_width=32, in_features=128, out_features=out_features,
                           adapter_ranks=adapter_ranks, tile_adapters=tiles, tokens_per_tile=tokens_per_tile,
                           **({} if max_rank is None else dict(max_rank=max_rank)))
    x, pool = jnp.asarray(p["x"], dtype), jnp.asarray(p["pool"], dtype)
    ys = tuple(jnp.asarray(y, dtype) for y in p["ys"])
    args = (pool, jnp.asarray(p["layer"]), jnp.asarray(p["tile_rank"]), tuple(map(jnp.asarray, p["a_pages"])),
            tuple(map(jnp.asarray, p["b_pages"])))
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=tokens_per_tile)
    # at one rank block, the programs that walk 4 column blocks also read their page ids before the branch
    # on the tile's rank (early_pages) and multiply one-row tiles elementwise (one_row_fma), the others not
    one_rank_block = dict(loads_first=True, one_row_dot=True, expand_one_row_dot=True, mask_rank=True,
                          early_pages=out_loop > 1, one_row_fma=out_loop > 1, expand_one_row_fma=out_loop > 1,
                          one_row_k_block=64 if out_loop > 1 else None) if max_rank else {}
    ours = lora_apply_group(x, ys, *args, interpret=True, out_loop=out_loop, out_block=16 if out_loop > 1 else None,
                            **one_rank_block, **opts)
    ref = lora_apply_group_reference(x, ys, *args, **opts)
    for t in range(num_targets):
        base = np.asarray(ys[t], np.float64)
        oracle = base + p["deltas"][t]
        allowed = BOUND[dtype] * np.linalg.norm(p["deltas"][t]) + np.linalg.norm(oracle) * float(jnp.finfo(dtype).eps)
        for out in (ours[t], ref[t]):
            out = np.asarray(out, np.float64)
            assert out.shape == oracle.shape and np.isfinite(out).all()
            assert np.linalg.norm(out - oracle) <= allowed + 1e-12, f"target {t}"
        untouched = np.repeat(p["tile_rank"][:, t] == 0, tokens_per_tile)
        np.testing.assert_array_equal(np.asarray(ours[t], np.float64)[untouched], base[untouched])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tiling", [
    dict(k_splits=1),
    dict(k_splits=3),                                                # uneven, the last split empty
    dict(k_splits=3, split_rows=True),                               # one-row tiles split too
    dict(k_splits=2, split_rows=True, k_block=32, out_block=32),     # shorter steps, narrower stores
    dict(k_splits=1, out_block=32, out_loop=4),                      # a program walks 4 column blocks
    dict(k_splits=1, one_row_dot=True, stages=3),                    # one-row tiles on tensor-core dots
    dict(k_splits=1, expand_one_row_dot=True),                       # ... in the expand only
    dict(k_splits=3, split_rows=True, one_row_dot=True, expand_one_row_dot=True, out_block=32, out_loop=2),
    dict(k_splits=2, one_row_dot=True, expand_one_row_dot=True, out_block=32, out_loop=4, loads_first=True),
    dict(k_splits=4, one_row_dot=True, stages=3, out_block=32, out_loop=4, loads_first=True),  # ranks > 16: walks
    dict(k_splits=4, one_row_dot=True, stages=3, mask_rank=True),   # partly filled rank blocks masked
    dict(k_splits=4, one_row_dot=True, stages=3, mask_rank=True, early_pages=True),  # page ids before the branch
    dict(k_splits=4, one_row_dot=True, stages=3, mask_rank=True, shrink_warps=2, expand_warps=2),  # fewer warps
    dict(k_splits=4, one_row_fma=True, mask_rank=True, early_pages=True),  # one-row tiles: elementwise, unrolled
    dict(k_splits=3, split_rows=True, one_row_fma=True, k_block=32),       # ... split unevenly: a loop
    dict(k_splits=4, one_row_fma=True, expand_one_row_fma=True, mask_rank=True),  # the expand's too: rank walks
    dict(k_splits=4, one_row_fma=True, one_row_k_block=128, mask_rank=True),  # 8 rows at a time, wider steps
    dict(k_splits=3, split_rows=True, one_row_fma=True, expand_one_row_fma=True, out_block=32, out_loop=4,
         loads_first=True, mask_rank=True),
    # one-row tiles and the others in launches of their own (the second updates the first's v and ys)
    dict(k_splits=4, one_row_dot=True, stages=3, mask_rank=True, kind_launches=True),
    dict(k_splits=3, split_rows=True, one_row_fma=True, expand_one_row_fma=True, out_block=32, out_loop=4,
         kind_launches=True, one_row_out_loop=2),
])
def test_mbgmv_gathered_tiles(rng, dtype, tiling):
    """Decode rows in any order, grouped by adapter into tiles of 16 (some adapters with more than 16
    rows, some with one, base-model rows in no tile, unused tiles), with the input features split
    over k_splits programs (one-row tiles too, with split_rows): equal to the oracle, and base-model
    rows untouched."""
    ranks = [1, 8, 16, 33, 64]
    # adapter 0: 17 rows (a full tile, then a tile of one row); adapter 1: a single row; base rows
    rows = [0] * 17 + [1] + [None] * 6 + [int(a) for a in rng.integers(2, len(ranks), int(rng.integers(8, 20)))]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    batch = len(rows)
    p = lora_problem(rng, num_layers=2, page_width=64, in_features=256, out_features=128,
                     adapter_ranks=ranks, tile_adapters=rows)
    tile_rows, rank, a_pages, b_pages = gathered_tiles(p, batch, 16)
    assert (rank > 0).sum() < batch  # some tiles unused
    x, y, pool = (jnp.asarray(p[k], dtype) for k in ("x", "y", "pool"))
    args = (pool, jnp.asarray(p["layer"]), jnp.asarray(rank), jnp.asarray(a_pages), jnp.asarray(b_pages),
            jnp.asarray(tile_rows))
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=16)
    ours = np.asarray(lora_apply(x, y, *args, interpret=True, **tiling, **opts), np.float64)
    ref = np.asarray(lora_apply_reference(x, y, *args, **opts), np.float64)
    base = np.asarray(y, np.float64)
    oracle = base + np.asarray(lora_delta(jnp.asarray(x, jnp.float32), jnp.asarray(p["dense_a"]),
                                          jnp.asarray(p["dense_b"]), jnp.asarray(p["row_ids"])), np.float64)
    allowed = BOUND[dtype] * np.linalg.norm(oracle - base) + np.linalg.norm(oracle) * float(jnp.finfo(dtype).eps)
    for out in (ours, ref):
        assert np.isfinite(out).all() and np.linalg.norm(out - oracle) <= allowed
    untouched = p["row_ids"] < 0
    np.testing.assert_array_equal(ours[untouched], base[untouched])


@pytest.mark.parametrize("tokens_per_tile", [1, 16])
def test_mask_rank_reads_no_null_page_row(rng, tokens_per_tile):
    """With mask_rank the rows of a rank block past an adapter's rank are never read: with NaN on the
    null page, which they point at, the result is still finite and right (without it, NaN leaks in)."""
    from pallas_kernels.pool import NULL_PAGE

    ranks = [1, 5, 8, 33]
    rows = [int(a) for a in rng.integers(0, len(ranks), 12)] + [None]
    p = lora_problem(rng, num_layers=2, page_width=64, in_features=128, out_features=64,
                     adapter_ranks=ranks, tile_adapters=rows)
    p["pool"].reshape(2, p["num_pages"], -1)[:, NULL_PAGE] = np.nan
    x, y, pool = (jnp.asarray(p[k], jnp.float32) for k in ("x", "y", "pool"))
    oracle = np.asarray(y, np.float64) + np.asarray(lora_delta(x, jnp.asarray(p["dense_a"]), jnp.asarray(
        p["dense_b"]), jnp.asarray(p["row_ids"])), np.float64)
    if tokens_per_tile == 1:
        args = [jnp.asarray(p[k]) for k in ("layer", "tile_rank", "a_pages", "b_pages")]
    else:
        tile_rows, rank, a_pages, b_pages = gathered_tiles(p, len(rows), 16)
        args = [jnp.asarray(v) for v in (p["layer"], rank, a_pages, b_pages, tile_rows)]
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=tokens_per_tile, k_splits=2, one_row_dot=True,
                interpret=True)
    masked = np.asarray(lora_apply(x, y, pool, *args, mask_rank=True, **opts), np.float64)
    assert np.isfinite(masked).all()
    assert np.linalg.norm(masked - oracle) <= 1e-5 * np.linalg.norm(oracle - np.asarray(y, np.float64))
    assert not np.isfinite(np.asarray(lora_apply(x, y, pool, *args, **opts))).all()


def test_tiles_by_adapter_covers_every_row_once():
    row_adapter = np.array([3, -1, 3, 0, 3, 3, 0, -1, 5] + [3] * 14)
    tile_rows, tile_adapter = tiles_by_adapter(row_adapter, num_tiles=len(row_adapter), tokens_per_tile=4)
    live = tile_adapter >= 0
    seen = {int(r) for rows in tile_rows[live] for r in rows}
    assert seen == set(np.flatnonzero(row_adapter >= 0).tolist())
    for rows, adapter in zip(tile_rows[live], tile_adapter[live]):
        assert (row_adapter[rows] == adapter).all()
    assert live.sum() == 1 + 1 + 5  # adapter 0: 2 rows, 5: 1 row, 3: 18 rows -> 5 tiles of 4
    with pytest.raises(ValueError, match="cannot hold"):
        tiles_by_adapter(row_adapter, num_tiles=6, tokens_per_tile=4)


def _tiles_by_adapter_loop(row_adapter, num_tiles, tokens_per_tile, none):
    """tiles_by_adapter written as a loop over adapters and tiles (what the vectorized one replaced)."""
    tile_rows = np.zeros((num_tiles, tokens_per_tile), np.int32)
    tile_adapter = np.full(num_tiles, none, row_adapter.dtype)
    tile = 0
    for adapter in np.unique(row_adapter[row_adapter != none]):
        rows = np.flatnonzero(row_adapter == adapter)
        for first in range(0, len(rows), tokens_per_tile):
            part = rows[first: first + tokens_per_tile]
            tile_rows[tile] = part[0]
            tile_rows[tile, : len(part)] = part
            tile_adapter[tile] = adapter
            tile += 1
    return tile_rows, tile_adapter


@pytest.mark.parametrize("tokens_per_tile", [1, 4, 16])
def test_tiles_by_adapter_equals_the_loop_on_random_batches(rng, tokens_per_tile):
    for _ in range(20):
        n = int(rng.integers(1, 300))
        row_adapter = rng.integers(-1, int(rng.integers(1, 40)), n).astype(np.int32)  # -1: no adapter
        got = tiles_by_adapter(row_adapter, n, tokens_per_tile, none=-1)
        want = _tiles_by_adapter_loop(row_adapter, n, tokens_per_tile, -1)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
