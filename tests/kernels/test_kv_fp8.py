"""FP8 keys and values in the pool (pallas_kernels.kv_fp8): the packing, and every attention kernel and the
K/V write in interpret mode against float64 attention over the FP8-rounded caches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_attention_kernels import BOUND, dense_attention, prefill_tiles, rel

from pallas_kernels.attention import paged_attention_reference, paged_decode_attention
from pallas_kernels.attention_prefill import paged_prefill_attention
from pallas_kernels.kv_fp8 import FP8_MAX, pack_rows, phases_of, unpack_rows, value_offset
from pallas_kernels.kv_write import write_kv
from pallas_kernels.problems import attention_problem

F32, BF16 = jnp.float32, jnp.bfloat16


def fp8_round(x):
    """float64 of x saturated to +-448 and rounded to float8 e4m3 (numpy's ml_dtypes, not our code)."""
    x = np.asarray(x, np.float32)
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pack_and_unpack_round_trip_fp8_values(rng, dtype):
    n = phases_of(dtype)
    rows = rng.standard_normal((5, 48)) * rng.uniform(0.01, 100, (5, 1))
    rows[0, :4] = [1e4, -1e4, 447.9, -0.0]      # saturated, not inf or NaN
    rows[1, 3] = np.nan                          # a hostile tenant's NaN stays its own element's
    words = pack_rows(jnp.asarray(rows, jnp.float32), dtype)
    assert words.dtype == dtype and words.shape == (5, 48 // n)
    back = np.asarray(unpack_rows(words, 48), np.float64)
    expected = fp8_round(rows)
    assert np.array_equal(np.isnan(back), np.isnan(expected)) and np.isnan(back).sum() == 1
    np.testing.assert_array_equal(np.nan_to_num(back), np.nan_to_num(expected))
    assert back[0, 0] == FP8_MAX and back[0, 1] == -FP8_MAX


def fp8_pool(rng, p, dtype, shared: bool = False):
    """The problem's pool with FP8 keys and values packed into every row: the keys its own values, the values
    (after them, value_offset) those of another random pool. shared: a token's value on its key's page
    (v_pages = k_pages, as the engine runs an FP8 cache). The rest of each row is random bits (NaN and Inf
    among them) that no kernel may read. -> (pool, dense_k, dense_v in float64, rounded to FP8), and
    p's v_pages replaced when shared."""
    keys = np.asarray(p["pool"], np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    width = keys.shape[1]
    n = phases_of(dtype)
    bits = rng.integers(0, 2 ** (8 * jnp.dtype(dtype).itemsize), keys.shape, dtype=np.uint64)
    pool = jax.lax.bitcast_convert_type(jnp.asarray(bits.astype({2: np.uint16, 4: np.uint32}[n])), dtype)
    pool = pool.at[:, : width // n].set(pack_rows(jnp.asarray(keys), dtype))
    pool = pool.at[:, value_offset(width, n): value_offset(width, n) + width // n].set(
        pack_rows(jnp.asarray(values), dtype))
    if shared:
        p["v_pages"] = p["k_pages"].copy()
    layer_rows = lambda a: a.reshape(-1, p["num_pages"], width)[p["layer"]]  # noqa: E731
    shape = p["dense_k"].shape
    dense_k = layer_rows(keys)[p["k_pages"]].reshape(shape) * (p["k_pages"] > 0)[..., None, None]
    dense_v = layer_rows(values)[p["v_pages"]].reshape(shape) * (p["v_pages"] > 0)[..., None, None]
    return pool, fp8_round(dense_k), fp8_round(dense_v)


# a bf16 pool packs 2 FP8 values a word, a float32 one 4: both on the main tilings
@pytest.mark.parametrize("dtype, heads, kv_heads, shared, tiling", [
    (BF16, 4, 4, False, dict(block_k=16, heads_per_program=2, splits=1)),                 # MHA, two heads a program
    (F32, 4, 4, False, dict(block_k=16, heads_per_program=2, splits=1)),
    (BF16, 8, 2, True, dict(block_k=16, heads_per_program=1, splits=4)),                  # GQA, split, XLA merges
    (BF16, 12, 4, True, dict(block_k=32, heads_per_program=2, splits=2, combine="kernel")),  # group 3, kernel merges
    (F32, 12, 4, True, dict(block_k=32, heads_per_program=2, splits=2, combine="kernel")),
    (BF16, 4, 4, False, dict(block_k=16, heads_per_program=2, splits=6, min_split_keys=48, combine="kernel")),
    (BF16, 8, 2, True, {}),                                                               # decode_launch_params'
    (BF16, 4, 4, True, dict(block_k=16, heads_per_program=2, splits=1, prefetch_pages=True)),
    (F32, 8, 2, True, dict(block_k=16, heads_per_program=1, splits=4, prefetch_pages=True)),
    (BF16, 8, 2, True, dict(block_k=16, heads_per_program=1, splits=1, mask_padding=True)),
    # KV heads packed into one query tile (PACK_HEADS): MHA, and GQA split with the kernel's merge
    (BF16, 4, 4, True, dict(block_k=16, heads_per_program=2, splits=1, pack_heads=True)),
    (F32, 4, 4, False, dict(block_k=32, heads_per_program=4, splits=1, pack_heads=True, mask_padding=True)),
    (BF16, 12, 4, True, dict(block_k=32, heads_per_program=2, splits=2, combine="kernel", pack_heads=True)),
])
def test_paged_decode_over_fp8_pages(rng, dtype, shared, heads, kv_heads, tiling):
    """Keys and values on pages of their own, or a token's both on one page (shared: the engine's layout)."""
    lens = [1, 100, 17, 64, 33, 2]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                          context_lens=lens, max_context=112)
    pool, dense_k, dense_v = fp8_pool(rng, p, dtype, shared)
    q = jnp.asarray(rng.standard_normal((len(lens), heads, 16)).astype(np.float32), dtype)
    expected = dense_attention(np.asarray(q, np.float64), dense_k, dense_v, p["lens"] - 1)
    tables = (jnp.asarray(p["layer"]), jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]))
    ours = paged_decode_attention(q, pool, *tables, num_pages=p["num_pages"], kv_fp8=True, interpret=True, **tiling)
    assert rel(ours, expected) < BOUND[dtype]
    ref = paged_attention_reference(q, pool, p["layer"], jnp.asarray(p["lens"] - 1), jnp.arange(len(lens)),
                                    *tables[2:], num_pages=p["num_pages"], kv_fp8=True)
    assert rel(ref, expected) < BOUND[dtype]
    # and not the plain kernel's reading of the same pages (the flag is not ignored)
    plain = paged_decode_attention(q, jnp.nan_to_num(pool), *tables, num_pages=p["num_pages"], interpret=True,
                                   **tiling)
    assert not rel(plain, expected) < 0.1


@pytest.mark.parametrize("dtype, heads, kv_heads", [(F32, 4, 4), (BF16, 8, 2), (BF16, 5, 5)])  # 5: 80-wide rows
def test_fp8_write_then_prefill(rng, dtype, heads, kv_heads):
    """New tokens' keys and values written as FP8 on one page each (padding rows on the null page write
    nothing), then prefill attention over the cached FP8 prefix and themselves."""
    d, tile = 16, 16
    prefix, new = [0, 21, 3], [5, 16, 18]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                          context_lens=[a + b for a, b in zip(prefix, new)], max_context=64)
    width = kv_heads * d
    pool, dense_k, dense_v = fp8_pool(rng, p, dtype, shared=True)
    tiles_seq, tiles_pos, rows_seq, rows_pos, k_pages, v_pages, real = prefill_tiles(p, prefix, new, tile)
    # the new tokens' pages scrubbed, so only write_kv can put their K/V back
    layered = pool.reshape(2, p["num_pages"], width)
    layered = layered.at[p["layer"], np.array(k_pages)[real]].set(7.0)
    k_new = np.full((len(rows_seq), width), 1e4, np.float32)   # padding rows: saturating values, written nowhere
    v_new = np.full_like(k_new, -1e4)
    k_new[real] = dense_k[rows_seq[real], rows_pos[real]].reshape(-1, width)
    v_new[real] = dense_v[rows_seq[real], rows_pos[real]].reshape(-1, width)
    null_before = np.asarray(layered[:, 0])
    pool = write_kv(layered.reshape(pool.shape), p["layer"], jnp.asarray(k_pages, jnp.int32),
                    jnp.asarray(v_pages, jnp.int32), jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype),
                    num_pages=p["num_pages"], kv_fp8=True, interpret=True)
    after = pool.reshape(2, p["num_pages"], width)
    np.testing.assert_array_equal(np.asarray(after[:, 0]).view(np.uint8), null_before.view(np.uint8))
    rows = after[p["layer"], np.array(k_pages)[real]]
    for start, new_values in ((0, k_new), (value_offset(width, phases_of(dtype)), v_new)):
        written = np.asarray(unpack_rows(rows[:, start:], width), np.float64)
        np.testing.assert_array_equal(written, fp8_round(np.asarray(jnp.asarray(new_values[real], dtype), np.float32)))

    q = jnp.asarray(rng.standard_normal((len(rows_seq), heads, d)).astype(np.float32), dtype)
    ours = paged_prefill_attention(q, pool, p["layer"], jnp.asarray(tiles_seq, jnp.int32),
                                   jnp.asarray(tiles_pos, jnp.int32), jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]),
                                   jnp.asarray(p["v_pages"]), num_pages=p["num_pages"], tile=tile, kv_fp8=True,
                                   interpret=True)
    # FP8 values are exact in the dtype: the written tokens read back as the prefix's do
    expected = dense_attention(np.asarray(q, np.float64), dense_k[rows_seq], dense_v[rows_seq], rows_pos)
    assert rel(np.asarray(ours)[real], expected[real]) < BOUND[dtype]


@pytest.mark.parametrize("pack_heads", [True, False])
def test_a_hostile_query_row_over_fp8_pages_changes_no_other_row(rng, pack_heads):
    """The FP8 cache's dots run in float16: a row of huge (1e30, clipped to float16's range) or NaN queries
    gives its own row's output only; every other row is bit for bit what it is without them, also where two
    heads share a query tile (pack_heads: the NaN head's neighbour sits in the same tile)."""
    lens = [40, 17, 64, 33]
    p = attention_problem(rng, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, context_lens=lens,
                          max_context=64)
    pool, dense_k, dense_v = fp8_pool(rng, p, BF16, shared=True)
    q = jnp.asarray(rng.standard_normal((len(lens), 4, 16)).astype(np.float32), BF16)
    tables = (jnp.asarray(p["layer"]), jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]))
    run = lambda q: np.asarray(paged_decode_attention(q, pool, *tables, num_pages=p["num_pages"], kv_fp8=True,  # noqa: E731
                                                      block_k=16, heads_per_program=2, pack_heads=pack_heads,
                                                      interpret=True), np.float32)
    clean = run(q)
    hostile = run(q.at[1].set(1e30).at[2, 0].set(jnp.nan))
    np.testing.assert_array_equal(hostile[[0, 3]], clean[[0, 3]])
    np.testing.assert_array_equal(hostile[2, 1:], clean[2, 1:])   # the NaN head's neighbours in its row too
    assert np.isfinite(hostile[1]).all()


def test_fp8_unpack_is_checked():
    p = attention_problem(np.random.default_rng(0), num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                          context_lens=[4], max_context=16)
    with pytest.raises(ValueError, match="fp8_unpack"):
        paged_decode_attention(jnp.asarray(p["pool"][:1].reshape(1, 2, 16), BF16), jnp.asarray(p["pool"], BF16), 0,
                               jnp.asarray([4]),
                               jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), num_pages=p["num_pages"],
                               kv_fp8=True, fp8_unpack="fast", interpret=True)
