"""pallas_kernels.lora_packed (experimental): one-row tiles packed P to a program, in interpret mode against the
problem's float64 deltas; its packing against a plain NumPy one; and both kernels lowered for CUDA on this CPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.kernel_ir import gpu_lowering
from pallas_kernels.lora import lora_apply_group
from pallas_kernels.lora_packed import lora_packed_group, packing
from pallas_kernels.problems import lora_group_problem

RANKS = [[8, 8, 8], [16, 4, 0], [4, 16, 8], [2, 2, 2]]   # a target an adapter leaves out has rank 0


def _problem(rng, tiles: int, dtype=jnp.bfloat16):
    hidden, max_rank = 256, 16
    adapters = [None if i % 7 == 3 else int(a) for i, a in enumerate(rng.integers(0, len(RANKS), tiles))]
    p = lora_group_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=[hidden] * 3,
                           adapter_ranks=RANKS, tile_adapters=adapters, max_rank=max_rank)
    x, pool = jnp.asarray(p["x"], dtype), jnp.asarray(p["pool"], dtype)
    ys = tuple(jnp.asarray(y, dtype) for y in p["ys"])
    return p, x, pool, ys, adapters


def _check(out, ys, deltas, bound):
    for o, y, d in zip(out, ys, deltas):
        got = np.asarray(o, np.float64) - np.asarray(y, np.float64)
        assert np.linalg.norm(d) > 1.0
        assert np.linalg.norm(got - d) / np.linalg.norm(d) < bound
        untouched = ~d.any(axis=1)                    # rows without this target keep y exactly
        np.testing.assert_array_equal(np.asarray(o)[untouched], np.asarray(y)[untouched])


@pytest.mark.parametrize("pack, row_block, k_splits", [(16, 128, 2), (8, 32, 1), (4, 64, 4)])
def test_packed_group_gives_the_deltas(rng, pack, row_block, k_splits):
    """Groups of several tiles, ranks 2-16 (several packed blocks a group where ranks add up past row_block),
    rows without an adapter, a last group part empty."""
    p, x, pool, ys, _ = _problem(rng, 21)
    out = lora_packed_group(x, ys, pool, p["layer"], jnp.asarray(p["tile_rank"]),
                            tuple(map(jnp.asarray, p["a_pages"])), tuple(map(jnp.asarray, p["b_pages"])),
                            num_pages=p["num_pages"], pack=pack, row_block=row_block, k_splits=k_splits,
                            k_block=32, out_block=64, interpret=True)
    _check(out, ys, p["deltas"], 2e-2)


def test_packed_group_in_float32(rng):
    p, x, pool, ys, _ = _problem(rng, 9, jnp.float32)
    out = lora_packed_group(x, ys, pool, p["layer"], jnp.asarray(p["tile_rank"]),
                            tuple(map(jnp.asarray, p["a_pages"])), tuple(map(jnp.asarray, p["b_pages"])),
                            num_pages=p["num_pages"], pack=16, row_block=64, k_splits=2, k_block=64,
                            out_block=128, interpret=True)
    _check(out, ys, p["deltas"], 1e-4)


def test_lora_apply_group_packed_with_tiles_out_of_row_order(rng):
    """The engine's entry (decode_lora_tile = 1): tiles in another order than the rows, and spare tiles (rank 0)
    naming row 0, which has an adapter: they must not write its old value back."""
    p, x, pool, ys, adapters = _problem(rng, 10)
    assert adapters[0] is not None
    order = np.concatenate([rng.permutation(10), [0, 0, 0]])
    spare = np.arange(len(order)) >= 10
    tile_rank = np.where(spare[:, None], 0, p["tile_rank"][order])
    out = lora_apply_group(x, ys, pool, p["layer"], jnp.asarray(tile_rank),
                           tuple(jnp.asarray(t[order]) for t in p["a_pages"]),
                           tuple(jnp.asarray(t[order]) for t in p["b_pages"]),
                           jnp.asarray(order[:, None], jnp.int32), num_pages=p["num_pages"], tokens_per_tile=1,
                           packed=True, packed_block=64, packed_k_splits=2, packed_k_block=64,
                           packed_out_block=128, interpret=True)
    _check(out, ys, p["deltas"], 2e-2)


def test_packing_puts_each_tiles_live_rows_first_in_tile_order():
    tile_rank = jnp.array([[2, 0], [0, 1], [3, 3]], jnp.int32)       # 3 tiles, 2 targets, max_rank 4
    pages = [(jnp.arange(12).reshape(3, 1, 4) + 100 * t, jnp.arange(12).reshape(3, 1, 4) + 100 * t + 50)
             for t in range(2)]
    pk = packing(tile_rank, pages, jnp.array([[5], [6], [7]], jnp.int32), pack=2, row_block=4)
    # groups: tiles (0, 1) and (2, pad); target 0 of group 0: tile 0's ranks 0-1, then nothing live
    np.testing.assert_array_equal(pk["owner"][0, 0], [0, 0, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(pk["a_pages"][0, 0, :2], [0, 1])
    np.testing.assert_array_equal(pk["owner"][1, 0, :1], [1])
    np.testing.assert_array_equal(pk["b_pages"][1, 0, :1], [154])
    np.testing.assert_array_equal(pk["owner"][0, 1, :4], [0, 0, 0, -1])
    np.testing.assert_array_equal(pk["a_pages"][0, 1, :3], [8, 9, 10])
    np.testing.assert_array_equal(np.asarray(pk["blocks"]).reshape(2, 2), [[1, 1], [1, 1]])
    m = 16
    np.testing.assert_array_equal(pk["rows"][:m], [5, 6] * 8)          # a group's 16 dot rows repeat its 2
    written = np.asarray(pk["rank"]).reshape(2, 2, m)
    np.testing.assert_array_equal(written[0, 0, :3], [2, 0, 0])        # rows past the pack write nothing
    np.testing.assert_array_equal(written[1, 1, :2], [3, 0])           # the padding tile writes nothing


def test_packed_kernels_lower_for_the_gpu_at_s1_shapes():
    S = jax.ShapeDtypeStruct
    fn = functools.partial(lora_packed_group, num_pages=100_000, interpret=False)
    pages = tuple(S((240, 1, 16), jnp.int32) for _ in range(3))
    text = gpu_lowering(fn, S((240, 4096), jnp.bfloat16), tuple(S((240, 4096), jnp.bfloat16) for _ in range(3)),
                        S((200_000, 4096), jnp.bfloat16), S((), jnp.int32), S((240, 3), jnp.int32), pages, pages,
                        S((240, 1), jnp.int32))
    assert "lora_packed_shrink" in text and "lora_packed_expand" in text
