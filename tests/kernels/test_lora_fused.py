"""The fused one-row LoRA kernel (pallas_kernels.lora_fused) in interpret mode against the float64 oracle."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora import lora_apply_group
from pallas_kernels.lora_fused import lora_fused_one_row
from pallas_kernels.pool import NULL_PAGE
from pallas_kernels.problems import gathered_tiles, lora_group_problem

BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
OUT_FEATURES = {"gqa_qkv": [128, 32, 32], "gate_up": [160, 160]}  # k/v as wide as a page; 160: no power of 2


def group_problem(rng, out_features, gathered: bool):
    """Rows of 4 adapters (ranks 0-16 per target, max rank one block of 16) and base rows; gathered: adapter
    0 has 17 rows (a tile of 16, then a one-row tile), the others one row or a few."""
    num_targets = len(out_features)
    adapter_ranks = [[16] * num_targets] + [[int(rng.choice([0, 1, 5, 8, 16])) for _ in range(num_targets)]
                                            for _ in range(3)]
    rows = ([0] * 17 + [1, 2, None, None, 3, 3] if gathered else
            [None if rng.random() < 0.2 else int(rng.integers(4)) for _ in range(9)])
    rows = [rows[i] for i in rng.permutation(len(rows))]
    p = lora_group_problem(rng, num_layers=2, page_width=32, in_features=128, out_features=out_features,
                           adapter_ranks=adapter_ranks, tile_adapters=rows, max_rank=16)
    if gathered:
        tile_rows, tile_rank, a_pages, b_pages = gathered_tiles(p, len(rows), 16)
    else:
        tile_rows, tile_rank, a_pages, b_pages = None, p["tile_rank"], p["a_pages"], p["b_pages"]
    return p, tile_rows, tile_rank, a_pages, b_pages


def operands(p, dtype, tile_rows, tile_rank, a_pages, b_pages):
    x, pool = jnp.asarray(p["x"], dtype), jnp.asarray(p["pool"], dtype)
    ys = tuple(jnp.asarray(y, dtype) for y in p["ys"])
    rows = () if tile_rows is None else (jnp.asarray(tile_rows),)
    return (x, ys, pool, jnp.asarray(p["layer"]), jnp.asarray(tile_rank), tuple(map(jnp.asarray, a_pages)),
            tuple(map(jnp.asarray, b_pages)), *rows)


def check(p, dtype, ours, ys, rows=None):
    """ours[t] equals y + delta on `rows` (default all) within the dtype's bound, and y exactly elsewhere."""
    for t, out in enumerate(ours):
        out, base = np.asarray(out, np.float64), np.asarray(ys[t], np.float64)
        assert np.isfinite(out).all()
        oracle = base + p["deltas"][t]
        mine = np.ones(len(base), bool) if rows is None else rows
        allowed = (BOUND[dtype] * np.linalg.norm(p["deltas"][t][mine])
                   + np.linalg.norm(oracle[mine]) * float(jnp.finfo(dtype).eps))
        assert np.linalg.norm(out[mine] - oracle[mine]) <= allowed, f"target {t}"
        np.testing.assert_array_equal(out[~mine], base[~mine])


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("out_features", list(OUT_FEATURES.values()), ids=list(OUT_FEATURES))
@pytest.mark.parametrize("dtype,tiling", [
    (jnp.float32, dict()),                                  # blocks capped by the page width (32), 4 reads ahead
    (jnp.bfloat16, dict()),
    (jnp.bfloat16, dict(fused_block=16, fused_depth=1)),    # each read just before its product
    (jnp.float32, dict(fused_block=32, fused_depth=64)),    # every read issued before the first product
], ids=["f32", "bf16", "bf16_b16_d1", "f32_b32_d64"])
def test_fused_group_equals_oracle(rng, dtype, gathered, out_features, tiling):
    """The whole group with fused_one_row: one-row tiles through the fused kernel, tiles of several rows
    through the shrink and expand: equal to the float64 oracle; base rows untouched."""
    p, tile_rows, tile_rank, a_pages, b_pages = group_problem(rng, out_features, gathered)
    x, ys, pool, layer, rank, a, b, *rows = operands(p, dtype, tile_rows, tile_rank, a_pages, b_pages)
    ours = lora_apply_group(x, ys, pool, layer, rank, a, b, *rows, num_pages=p["num_pages"],
                            tokens_per_tile=16 if gathered else 1, k_splits=2, mask_rank=True, fused_one_row=True,
                            interpret=True, **tiling)
    check(p, dtype, ours, ys)


def test_fused_kernel_covers_exactly_the_one_row_tiles(rng):
    """Alone, the fused kernel adds LoRA to the rows of one-row tiles and to no other row (the tile of 16
    keeps y, so the group test fails if either launch is skipped), and never reads the rows of a rank
    block past the adapter's rank: NaN on the null page, which they point at, does not leak in."""
    p, tile_rows, tile_rank, a_pages, b_pages = group_problem(rng, OUT_FEATURES["gqa_qkv"], gathered=True)
    p["pool"].reshape(2, p["num_pages"], -1)[:, NULL_PAGE] = np.nan
    args = operands(p, jnp.float32, tile_rows, tile_rank, a_pages, b_pages)
    ours = lora_fused_one_row(*args, num_pages=p["num_pages"], tokens_per_tile=16, interpret=True)
    one_row_tiles = (tile_rows[:, 1] == tile_rows[:, 0]) & (tile_rank.max(axis=1) > 0)
    fused_rows = np.zeros(len(p["x"]), bool)
    fused_rows[tile_rows[one_row_tiles, 0]] = True
    assert 0 < fused_rows.sum() < (p["row_ids"] >= 0).sum()  # some adapter rows are left to the other kernels
    check(p, jnp.float32, ours, args[1], fused_rows)


def test_fused_kernel_refuses_several_rank_blocks(rng):
    """Adapters padded past one rank block: a clear error from the kernel; lora_apply_group then runs the
    shrink and expand for every tile and still equals the oracle."""
    p = lora_group_problem(rng, num_layers=1, page_width=32, in_features=64, out_features=[32],
                           adapter_ranks=[[33], [8]], tile_adapters=[0, 1, None], max_rank=64)
    args = operands(p, jnp.float32, None, p["tile_rank"], p["a_pages"], p["b_pages"])
    with pytest.raises(ValueError, match="one rank block"):
        lora_fused_one_row(*args, num_pages=p["num_pages"], interpret=True)
    check(p, jnp.float32, lora_apply_group(*args, num_pages=p["num_pages"], fused_one_row=True, interpret=True),
          args[1])
