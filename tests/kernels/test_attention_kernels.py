"""Paged attention kernels in interpret mode against float64 numpy attention over dense caches."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import (
    decode_counters,
    paged_attention_reference,
    paged_decode_attention,
    paged_decode_attention_counted,
)
from pallas_kernels.attention_prefill import paged_prefill_attention
from pallas_kernels.kv_write import write_kv
from pallas_kernels.problems import attention_problem

BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def dense_attention(q, k, v, q_pos):
    """q [N, Hq, D] float64; k, v [N, S, Hkv, D]; causal by absolute position."""
    group = q.shape[1] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("nhd,nshd->nhs", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.arange(k.shape[1])[None, None] <= q_pos[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("nhs,nshd->nhd", probs / probs.sum(-1, keepdims=True), v)


def rel(a, b):
    a = np.asarray(a, np.float64)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_paged_decode(rng, dtype, heads, kv_heads):
    lens = [1, 37, 16, 5, 50][: int(rng.choice([1, 3, 5]))]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                          context_lens=lens, max_context=64)
    q = rng.standard_normal((len(lens), heads, 16)).astype(np.float32)
    pool = jnp.asarray(p["pool"], dtype)
    q_d = jnp.asarray(q, dtype)
    expected = dense_attention(np.asarray(q_d, np.float64), np.asarray(jnp.asarray(p["dense_k"], dtype), np.float64),
                               np.asarray(jnp.asarray(p["dense_v"], dtype), np.float64), p["lens"] - 1)
    args = (jnp.asarray(p["layer"]), jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]))
    ours = paged_decode_attention(q_d, pool, *args, num_pages=p["num_pages"], interpret=True)
    assert rel(ours, expected) < BOUND[dtype]
    ref = paged_attention_reference(q_d, pool, p["layer"], jnp.asarray(p["lens"] - 1), jnp.arange(len(lens)),
                                    jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), num_pages=p["num_pages"])
    assert rel(ref, expected) < BOUND[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, tiling", [
    (4, 4, dict(block_k=16, heads_per_program=2, splits=1)),     # MHA, two heads per program
    (4, 4, dict(block_k=32, heads_per_program=4, splits=3)),     # all heads in one program, context split
    (8, 2, dict(block_k=16, heads_per_program=1, splits=4)),     # GQA group 4 in a 16-row tile, split
    (12, 4, dict(block_k=32, heads_per_program=2, splits=2)),    # group 3: not a power of two
    (32, 2, dict(block_k=16, heads_per_program=1, splits=1)),    # group 16: the tile is all real rows
    (64, 2, dict(block_k=64, heads_per_program=2, splits=5)),    # group 32: a 32-row tile
    # the splits merged in the kernel, by the last of each (sequence, KV heads) to finish
    (8, 2, dict(block_k=16, heads_per_program=1, splits=4, combine="kernel")),
    (64, 2, dict(block_k=64, heads_per_program=2, splits=5, combine="kernel")),
    # MHA, two heads a program, more splits than most sequences fill (batch 1 of Llama-7B: a context of ~160
    # keys in a table of 2,048 fills 3 of 32): the merge reads only the splits that hold keys
    (4, 4, dict(block_k=16, heads_per_program=2, splits=6, combine="kernel")),
    # splits of at least 3 blocks: the shorter sequences fill one split (written directly, no merge) or two
    (4, 4, dict(block_k=16, heads_per_program=2, splits=6, min_split_keys=48, combine="kernel")),
    (8, 2, dict(block_k=16, heads_per_program=1, splits=4, min_split_keys=40)),
    # the K/V gathers masked past each length (padding touches no memory)
    (8, 2, dict(block_k=16, heads_per_program=1, splits=1, mask_padding=True)),
    (4, 4, dict(block_k=16, heads_per_program=2, splits=3, mask_padding=True, prefetch_pages=True)),
    # the next block's page ids read one step ahead: unsplit, split, merged in the kernel
    (4, 4, dict(block_k=16, heads_per_program=2, splits=1, prefetch_pages=True)),
    (12, 4, dict(block_k=32, heads_per_program=2, splits=3, prefetch_pages=True)),
    (8, 2, dict(block_k=16, heads_per_program=1, splits=4, combine="kernel", prefetch_pages=True)),
    # a program's KV heads packed block-diagonally into one query tile: MHA two and four heads, GQA group 2
    # and group 3 (tile rows not a power of two a head), split, merged in the kernel, masked, prefetched
    (4, 4, dict(block_k=16, heads_per_program=2, splits=1, pack_heads=True)),
    (4, 4, dict(block_k=32, heads_per_program=4, splits=3, pack_heads=True)),
    (8, 4, dict(block_k=16, heads_per_program=4, splits=1, pack_heads=True, mask_padding=True)),
    (12, 4, dict(block_k=32, heads_per_program=2, splits=3, combine="kernel", pack_heads=True)),
    (4, 4, dict(block_k=16, heads_per_program=2, splits=1, pack_heads=True, prefetch_pages=True, num_stages=3)),
])
def test_paged_decode_tilings(rng, dtype, heads, kv_heads, tiling):
    """Every tiling of the decode kernel (several KV heads per program, the context split over programs
    and combined after, query tiles padded to 16 rows) on ragged lengths (1 to 100 keys, some splits
    empty) with null-page padding, against float64 attention over dense caches."""
    lens = [1, 100, 17, 64, 33, 2]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                          context_lens=lens, max_context=112)
    q = jnp.asarray(rng.standard_normal((len(lens), heads, 16)).astype(np.float32), dtype)
    expected = dense_attention(np.asarray(q, np.float64), np.asarray(jnp.asarray(p["dense_k"], dtype), np.float64),
                               np.asarray(jnp.asarray(p["dense_v"], dtype), np.float64), p["lens"] - 1)
    ours = paged_decode_attention(q, jnp.asarray(p["pool"], dtype), jnp.asarray(p["layer"]), jnp.asarray(p["lens"]),
                                  jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), num_pages=p["num_pages"],
                                  interpret=True, **tiling)
    assert rel(ours, expected) < BOUND[dtype]


@pytest.mark.parametrize("heads, kv_heads, tiling", [
    (8, 2, dict(block_k=16, heads_per_program=1, splits=4, combine="kernel")),
    (4, 4, dict(block_k=16, heads_per_program=2, splits=6, min_split_keys=48, combine="kernel")),
    (12, 4, dict(block_k=32, heads_per_program=2, splits=3, combine="kernel", pack_heads=True)),
])
def test_merge_counters_come_back_zeroed_and_serve_the_next_call(rng, heads, kv_heads, tiling):
    """The in-kernel merge counts finished splits per (sequence, KV heads): the last one leaves its counter at
    zero, so a step's layers pass one zeroed array on instead of zeroing their own; a counter left nonzero
    would make the next call merge early (wrong outputs). Ragged lengths: some pairs fill one split (no
    counting), some splits hold no keys (no counting)."""
    lens = [1, 100, 17, 64, 33, 2]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                          context_lens=lens, max_context=112)
    counters = decode_counters(len(lens), kv_heads)
    for call in range(3):  # the same counters through three calls, new queries each time
        q = jnp.asarray(rng.standard_normal((len(lens), heads, 16)).astype(np.float32))
        expected = dense_attention(np.asarray(q, np.float64), np.asarray(p["dense_k"], np.float64),
                                   np.asarray(p["dense_v"], np.float64), p["lens"] - 1)
        out, counters = paged_decode_attention_counted(
            q, jnp.asarray(p["pool"]), jnp.asarray(p["layer"]), jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]),
            jnp.asarray(p["v_pages"]), counters, num_pages=p["num_pages"], interpret=True, **tiling)
        assert rel(out, expected) < BOUND[jnp.float32], call
        np.testing.assert_array_equal(np.asarray(counters), 0)
    with pytest.raises(ValueError, match="counters"):
        paged_decode_attention_counted(q, jnp.asarray(p["pool"]), jnp.asarray(p["layer"]), jnp.asarray(p["lens"]),
                                       jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), decode_counters(1, 1),
                                       num_pages=p["num_pages"], interpret=True, **tiling)


@pytest.mark.parametrize("splits, combine, min_split_keys", [(1, "xla", 0), (3, "xla", 0), (3, "kernel", 0),
                                                             (3, "kernel", 64)])
def test_paged_decode_idle_rows_are_exact_zeros(rng, splits, combine, min_split_keys):
    """A mixed step hands the decode kernel rows that are not decode rows (length 0): they do no work
    and come out as exact zeros (never NaN, whatever their tables point at), the live rows unchanged."""
    lens = [0, 37, 0, 5]
    p = attention_problem(rng, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                          context_lens=[1 if n == 0 else n for n in lens], max_context=64)
    q = jnp.asarray(rng.standard_normal((len(lens), 8, 16)).astype(np.float32))
    live = np.array(lens) > 0
    expected = dense_attention(np.asarray(q, np.float64), np.asarray(p["dense_k"], np.float64),
                               np.asarray(p["dense_v"], np.float64), p["lens"] - 1)
    ours = np.asarray(paged_decode_attention(q, jnp.asarray(p["pool"]), jnp.asarray(p["layer"]), jnp.asarray(lens),
                                             jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]),
                                             num_pages=p["num_pages"], interpret=True, block_k=16, splits=splits,
                                             combine=combine, min_split_keys=min_split_keys))
    assert (ours[~live] == 0).all()
    assert rel(ours[live], expected[live]) < BOUND[jnp.float32]


def test_decode_launch_params_split_small_batches(monkeypatch):
    from pallas_kernels import decode_tiling
    from pallas_kernels.decode_tiling import decode_launch_params

    assert decode_launch_params(256, 32, 1, 4096) == {"block_k": 32, "heads_per_program": 2, "splits": 1,
                                                          "min_split_keys": 0, "num_warps": 2, "combine": "xla",
                                                          "prefetch_pages": False, "num_stages": 3,
                                                          "pack_heads": True}
    gqa = decode_launch_params(256, 8, 4, 4096)
    assert gqa["splits"] == 1 and gqa["heads_per_program"] == 1
    assert gqa["prefetch_pages"] and gqa["num_stages"] == 3   # measured faster (twenty-eighth session)
    small = decode_launch_params(1, 8, 4, 4096)
    assert small["heads_per_program"] == 1 and small["splits"] == 32  # fills the multiprocessors
    assert small["combine"] == "kernel"   # measured faster at batch 1 (RESULTS.md, twenty-first session)
    # two warps, page ids a step ahead: 11% faster there, even or slower elsewhere (forty-second session)
    assert (small["num_warps"], small["prefetch_pages"], small["num_stages"]) == (2, True, 3)
    # ... over a bf16 cache: over FP8 it was 9-10% slower at contexts 160 and 1,024 (forty-third session)
    fp8 = decode_launch_params(1, 8, 4, 4096, kv_fp8=True)
    assert (fp8["splits"], fp8["num_warps"], fp8["prefetch_pages"], fp8["num_stages"]) == (32, 4, False, 2)
    short = decode_launch_params(1, 8, 4, 1024)
    assert short["splits"] == 16 and (short["num_warps"], short["prefetch_pages"]) == (4, False)
    monkeypatch.setattr(decode_tiling, "SINGLE_SEQUENCE_PIPELINE", False)  # the old tiling, for A/B runs
    old = decode_launch_params(1, 8, 4, 4096)
    assert (old["num_warps"], old["prefetch_pages"], old["num_stages"]) == (4, False, 2)
    assert decode_launch_params(8, 8, 4, 4096)["combine"] == "xla"
    assert decode_launch_params(1, 8, 4, 64)["splits"] == 1  # one block: nothing to split
    # batch 1 of MHA (Llama-7B): merged in the kernel, one KV head a program (twenty-fifth session)
    mha = decode_launch_params(1, 32, 1, 2048)
    assert (mha["combine"], mha["heads_per_program"], mha["splits"]) == ("kernel", 1, 32)
    assert (mha["num_warps"], mha["prefetch_pages"]) == (4, False)
    assert decode_launch_params(2, 32, 1, 2048)["combine"] == "xla"


def prefill_tiles(p, prefix: list[int], new: list[int], tile: int):
    """Sequences with `prefix` tokens cached getting `new` ones, laid out as the engine's prefill tiles:
    (tiles_seq, tiles_pos, then per row: its sequence, position, K and V page (0 for padding rows), and
    whether it is a real token)."""
    tiles_seq, tiles_pos, rows_seq, rows_pos, k_pages, v_pages, real = [], [], [], [], [], [], []
    for s, (a, b) in enumerate(zip(prefix, new)):
        for t0 in range(0, b, tile):
            tiles_seq.append(s)
            tiles_pos.append(a + t0)
            for j in range(tile):
                pos, is_real = a + t0 + j, t0 + j < b
                rows_seq.append(s)
                rows_pos.append(pos)
                k_pages.append(p["k_pages"][s, pos] if is_real else 0)
                v_pages.append(p["v_pages"][s, pos] if is_real else 0)
                real.append(is_real)
    return tiles_seq, tiles_pos, np.array(rows_seq), np.array(rows_pos), k_pages, v_pages, np.array(real)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (5, 5)])  # 5 heads: rows of 80, not a power of two
def test_paged_prefill_with_cached_prefix(rng, dtype, heads, kv_heads):
    """Sequences with a cached prefix (0, 21, 3 tokens) get new tokens (5, 16, 18): write K/V, attend."""
    d, tile = 16, 16
    prefix, new = [0, 21, 3], [5, 16, 18]
    total = [a + b for a, b in zip(prefix, new)]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                          context_lens=total, max_context=64)
    width = kv_heads * d
    tiles_seq, tiles_pos, rows_seq, rows_pos, k_pages, v_pages, new_rows = prefill_tiles(p, prefix, new, tile)
    n = len(rows_seq)
    # the new tokens' true K/V are in dense_k/v; scrub their pages so only write_kv can put them back
    pool = p["pool"].copy().reshape(2, p["num_pages"], width)
    real_k, real_v = np.array(k_pages)[new_rows], np.array(v_pages)[new_rows]
    pool[p["layer"], real_k] = 7.0
    pool[p["layer"], real_v] = -7.0
    k_new = np.zeros((n, width), np.float32)
    v_new = np.zeros((n, width), np.float32)
    seq_idx, pos_idx = rows_seq[new_rows], rows_pos[new_rows]
    k_new[new_rows] = p["dense_k"][seq_idx, pos_idx].reshape(-1, width)
    v_new[new_rows] = p["dense_v"][seq_idx, pos_idx].reshape(-1, width)
    k_new[~new_rows] = 99.0  # padding rows' K/V must not land anywhere (their page is the null page)
    v_new[~new_rows] = 99.0
    pool = write_kv(jnp.asarray(pool.reshape(p["pool"].shape), dtype), p["layer"], jnp.asarray(k_pages, jnp.int32),
                    jnp.asarray(v_pages, jnp.int32), jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype),
                    num_pages=p["num_pages"], interpret=True)
    layered = np.asarray(pool, np.float32).reshape(2, p["num_pages"], width)
    assert not layered[:, 0].any(), "the null page was written"
    np.testing.assert_array_equal(layered[p["layer"], real_k],
                                  np.asarray(jnp.asarray(k_new[new_rows], dtype), np.float32))

    q = jnp.asarray(rng.standard_normal((n, heads, d)).astype(np.float32), dtype)
    ours = paged_prefill_attention(q, pool, p["layer"], jnp.asarray(tiles_seq, jnp.int32),
                                   jnp.asarray(tiles_pos, jnp.int32), jnp.asarray(p["lens"]), jnp.asarray(p["k_pages"]),
                                   jnp.asarray(p["v_pages"]), num_pages=p["num_pages"], tile=tile, interpret=True)
    dense_k = np.asarray(jnp.asarray(p["dense_k"], dtype), np.float64)[np.array(rows_seq)]
    dense_v = np.asarray(jnp.asarray(p["dense_v"], dtype), np.float64)[np.array(rows_seq)]
    expected = dense_attention(np.asarray(q, np.float64), dense_k, dense_v, np.array(rows_pos))
    assert rel(np.asarray(ours)[new_rows], expected[new_rows]) < BOUND[dtype]


def stale_nan_problem(rng, heads, kv_heads, lens, d=16, max_context=64):
    """An attention problem whose page tables point, past each sequence's length, at free pages full of
    NaN (what a finished request of another tenant, or a NaN adapter, can leave in the pool)."""
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                          context_lens=lens, max_context=max_context, spare_pages=8)
    used = set(np.concatenate([p["k_pages"].ravel(), p["v_pages"].ravel()]).tolist())
    spare = np.array(sorted(set(range(1, p["num_pages"])) - used), np.int32)
    pool = p["pool"].reshape(2, p["num_pages"], -1)
    pool[:, spare] = np.nan
    for table in (p["k_pages"], p["v_pages"]):
        for s, n in enumerate(lens):
            table[s, n:] = spare[(np.arange(max_context - n) + s) % len(spare)]
    p["pool"] = pool.reshape(p["pool"].shape)
    return p


@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("heads, kv_heads, pack_heads", [(4, 4, False), (4, 4, True), (8, 2, False)])
def test_decode_ignores_nan_in_the_null_page(rng, heads, kv_heads, pack_heads, mask_padding):
    """Keys past a sequence's length name the null page (their table entries are not even read): NaN there
    changes no output, whether those keys are read and zeroed (mask_padding False) or never read (True)."""
    lens = [3, 17, 30]
    p = attention_problem(rng, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                          context_lens=lens, max_context=64)
    q = jnp.asarray(rng.standard_normal((len(lens), heads, 16)).astype(np.float32))
    pool = p["pool"].reshape(2, p["num_pages"], -1).copy()
    pool[:, 0] = np.nan                       # the null page of both layers
    expected = dense_attention(np.asarray(q, np.float64), np.asarray(p["dense_k"], np.float64),
                               np.asarray(p["dense_v"], np.float64), p["lens"] - 1)
    ours = paged_decode_attention(q, jnp.asarray(pool.reshape(p["pool"].shape)), p["layer"], jnp.asarray(p["lens"]),
                                  jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]), num_pages=p["num_pages"],
                                  block_k=16, mask_padding=mask_padding, pack_heads=pack_heads, interpret=True)
    assert rel(ours, expected) < BOUND[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_stale_nan_pages_past_the_length_change_nothing(rng, dtype, heads, kv_heads):
    """Masked positions contribute exact zeros whatever their pages hold: decode, prefill and the
    reference give the same outputs as with clean pages, and no NaN."""
    lens = [3, 17, 30]
    p = stale_nan_problem(rng, heads, kv_heads, lens)
    q = jnp.asarray(rng.standard_normal((len(lens), heads, 16)).astype(np.float32), dtype)
    pool = jnp.asarray(p["pool"], dtype)
    tables = (jnp.asarray(p["k_pages"]), jnp.asarray(p["v_pages"]))
    expected = dense_attention(np.asarray(q, np.float64), np.asarray(jnp.asarray(p["dense_k"], dtype), np.float64),
                               np.asarray(jnp.asarray(p["dense_v"], dtype), np.float64), p["lens"] - 1)
    ours = paged_decode_attention(q, pool, p["layer"], jnp.asarray(p["lens"]), *tables, num_pages=p["num_pages"],
                                  interpret=True)
    assert rel(ours, expected) < BOUND[dtype]
    ref = paged_attention_reference(q, pool, p["layer"], jnp.asarray(p["lens"] - 1), jnp.arange(len(lens)), *tables,
                                    num_pages=p["num_pages"])
    assert rel(ref, expected) < BOUND[dtype]
    # prefill: each sequence's whole prompt in tiles of 16; the last tile's padding rows see NaN keys
    tile = 16
    tiles_seq = [s for s, n in enumerate(lens) for _ in range(-(-n // tile))]
    tiles_pos = [t * tile for n in lens for t in range(-(-n // tile))]
    rows_pos = np.array([pos + j for pos in tiles_pos for j in range(tile)])
    rows_seq = np.repeat(tiles_seq, tile)
    real = rows_pos < np.array(lens)[rows_seq]
    qp = jnp.asarray(rng.standard_normal((len(rows_pos), heads, 16)).astype(np.float32), dtype)
    ours = paged_prefill_attention(qp, pool, p["layer"], jnp.asarray(tiles_seq, jnp.int32),
                                   jnp.asarray(tiles_pos, jnp.int32), jnp.asarray(p["lens"]), *tables,
                                   num_pages=p["num_pages"], tile=tile, interpret=True)
    dense = [np.asarray(jnp.asarray(p[k], dtype), np.float64)[rows_seq] for k in ("dense_k", "dense_v")]
    expected = dense_attention(np.asarray(qp, np.float64), *dense, rows_pos)
    assert rel(np.asarray(ours)[real], expected[real]) < BOUND[dtype]


def test_triton_blocks_are_powers_of_two_for_real_widths():
    """Triton needs power-of-two blocks: Llama-13B's 5120-wide rows go in blocks of 1024."""
    from pallas_kernels.triton_compat import power_of_two_block

    assert power_of_two_block(5120, cap=1024) == 1024
    assert power_of_two_block(80, cap=1024) == 16
    assert power_of_two_block(8192, 1024, cap=512) == 512


def test_a_steps_layers_hand_the_merge_counters_on():
    """jslora.model.paged._attention: the first layer's decode call makes the merge counters (None in), each
    later layer gets the ones the call before returned, so a step zeroes them once, not once a layer."""
    from types import SimpleNamespace

    from jslora.model.paged import _attention

    seen = []

    class Recording:
        def decode_attention(self, q, pool, layer, lens, k_pages, v_pages, *, counters, **_):
            seen.append(counters)
            return q, f"counters after layer {layer}"

    decode = SimpleNamespace(lens=jnp.ones((2,), jnp.int32), k_blocks=jnp.zeros((2, 1), jnp.int32),
                             v_blocks=jnp.zeros((2, 1), jnp.int32))
    spec = SimpleNamespace(num_pages=4, interpret=True, kv_fp8=False, kv_block=16, backend=Recording())
    attention = _attention(spec, SimpleNamespace(decode=decode, prefill=None))
    for layer in range(3):
        attention(jnp.zeros((2, 4, 16)), None, layer)
    assert seen == [None, "counters after layer 0", "counters after layer 1"]
