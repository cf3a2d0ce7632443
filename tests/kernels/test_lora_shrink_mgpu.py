"""pallas_kernels.lora_shrink_mgpu (experimental, Mosaic GPU) in Mosaic GPU's interpret mode against x @ A^T read
from the pool's pages in float64, and beside the Triton shrink; and its GPU path lowered for CUDA on this CPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_ir import gpu_lowering
from pallas_kernels.lora import lora_apply_group
from pallas_kernels.lora_expand_mgpu import lora_expand_mgpu
from pallas_kernels.lora_shrink import lora_shrink
from pallas_kernels.lora_shrink_mgpu import lora_shrink_mgpu
from pallas_kernels.problems import lora_group_problem


def test_mgpu_shrink_matches_the_pages_and_the_triton_shrink(rng):
    hidden, max_rank = 256, 16
    ranks = [[8, 8, 8], [16, 4, 0], [4, 16, 8]]            # a target an adapter leaves out has rank 0
    p = lora_group_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=[hidden] * 3,
                           adapter_ranks=ranks, tile_adapters=[2, None, 0, 1, 2], max_rank=max_rank)
    x, pool = jnp.asarray(p["x"], jnp.bfloat16), jnp.asarray(p["pool"], jnp.bfloat16)
    a_pages = tuple(jnp.asarray(t) for t in p["a_pages"])
    got = np.asarray(lora_shrink_mgpu(x, pool, p["layer"], jnp.asarray(p["tile_rank"]), a_pages,
                                      num_pages=p["num_pages"], block_k=128, stages=2, interpret=True))
    assert got.shape == (1, 5, 3 * max_rank)
    xf, pf = np.asarray(x, np.float64), np.asarray(pool, np.float64)
    want = np.zeros((5, 3, max_rank))
    for n in range(5):
        for t in range(3):
            rank = p["tile_rank"][n, t]
            want[n, t, :rank] = pf[p["layer"] * p["num_pages"] + p["a_pages"][t][n, 0, :rank]] @ xf[n]
    assert np.abs(want).max() > 1.0   # rows with adapters give non-trivial sums
    np.testing.assert_allclose(got[0].reshape(5, 3, max_rank), want, rtol=1e-4, atol=1e-4)
    triton = np.asarray(lora_shrink(x, pool, p["layer"], jnp.asarray(p["tile_rank"]),
                                    jnp.concatenate(a_pages, axis=2), num_pages=p["num_pages"], interpret=True))
    live = (np.arange(max_rank)[None, None] < p["tile_rank"][:, :, None]).reshape(5, -1)
    np.testing.assert_allclose(got[0][live], triton[0][live], rtol=1e-4, atol=1e-4)


def test_mgpu_shrink_lowers_for_the_gpu_at_s1_shapes():
    S = jax.ShapeDtypeStruct
    fn = functools.partial(lora_shrink_mgpu, num_pages=100_000, block_k=256, stages=4, interpret=False)
    pages = tuple(S((240, 1, 16), jnp.int32) for _ in range(3))
    text = gpu_lowering(fn, S((240, 4096), jnp.bfloat16), S((200_000, 4096), jnp.bfloat16), S((), jnp.int32),
                        S((240, 3), jnp.int32), pages)
    assert "mosaic_gpu" in text


def test_mgpu_expand_after_mgpu_shrink_gives_the_deltas(rng):
    """lora_expand_mgpu after lora_shrink_mgpu: ys + x A B for every row and target, against the problem's
    float64 deltas (rows without an adapter keep their y)."""
    hidden, max_rank = 256, 16
    p = lora_group_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=[hidden] * 3,
                           adapter_ranks=[[8, 8, 8], [16, 4, 0], [4, 16, 8]], tile_adapters=[2, None, 0, 1, 2],
                           max_rank=max_rank)
    x, pool = jnp.asarray(p["x"], jnp.bfloat16), jnp.asarray(p["pool"], jnp.bfloat16)
    ys = tuple(jnp.asarray(y, jnp.bfloat16) for y in p["ys"])
    tile_rank = jnp.asarray(p["tile_rank"])
    opts = dict(num_pages=p["num_pages"], stages=2, interpret=True)
    v = lora_shrink_mgpu(x, pool, p["layer"], tile_rank, tuple(map(jnp.asarray, p["a_pages"])), block_k=128, **opts)
    out = lora_expand_mgpu(v, ys, pool, p["layer"], tile_rank, tuple(map(jnp.asarray, p["b_pages"])),
                           block_n=128, **opts)
    for o, y, d in zip(out, ys, p["deltas"]):
        got = np.asarray(o, np.float64) - np.asarray(y, np.float64)
        assert np.linalg.norm(d) > 1.0
        assert np.linalg.norm(got - d) / np.linalg.norm(d) < 2e-2
        np.testing.assert_array_equal(np.asarray(o)[1], np.asarray(y)[1])   # the row without an adapter


def test_mgpu_expand_lowers_for_the_gpu_at_s1_shapes():
    S = jax.ShapeDtypeStruct
    fn = functools.partial(lora_expand_mgpu, num_pages=100_000, block_n=256, stages=4, interpret=False)
    text = gpu_lowering(fn, S((1, 240, 48), jnp.float32), tuple(S((240, 4096), jnp.bfloat16) for _ in range(3)),
                        S((200_000, 4096), jnp.bfloat16), S((), jnp.int32), S((240, 3), jnp.int32),
                        tuple(S((240, 1, 16), jnp.int32) for _ in range(3)))
    assert "mosaic_gpu" in text


def test_lora_apply_group_on_mgpu_with_tiles_out_of_row_order(rng):
    """The engine's entry (lora_apply_group with mgpu, decode_lora_tile = 1): tiles in another order than the
    rows, and spare tiles (rank 0) that name row 0, which must leave it as its own tile makes it (interpret
    mode runs the programs one by one: the race on the GPU that the kernel's rank guard prevents cannot show)."""
    hidden, max_rank = 256, 16
    p = lora_group_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=[hidden] * 3,
                           adapter_ranks=[[8, 8, 8], [16, 4, 0], [4, 16, 8]], tile_adapters=[2, None, 0, 1, 2],
                           max_rank=max_rank)
    order = np.array([3, 0, 4, 2, 1, 0, 0])                      # rows 0..4 shuffled, then two spare tiles
    spare = np.arange(len(order)) >= 5
    tile_rank = np.where(spare[:, None], 0, p["tile_rank"][order])
    a_pages = tuple(jnp.asarray(t[order]) for t in p["a_pages"])
    b_pages = tuple(jnp.asarray(t[order]) for t in p["b_pages"])
    x, pool = jnp.asarray(p["x"], jnp.bfloat16), jnp.asarray(p["pool"], jnp.bfloat16)
    ys = tuple(jnp.asarray(y, jnp.bfloat16) for y in p["ys"])
    out = lora_apply_group(x, ys, pool, p["layer"], jnp.asarray(tile_rank), a_pages, b_pages,
                           jnp.asarray(order[:, None], jnp.int32), num_pages=p["num_pages"], tokens_per_tile=1,
                           mgpu=True, mgpu_block=128, mgpu_stages=2, interpret=True)
    for o, y, d in zip(out, ys, p["deltas"]):
        got = np.asarray(o, np.float64) - np.asarray(y, np.float64)
        assert np.linalg.norm(d[0]) > 1.0   # row 0 has an adapter: the spare tiles must not undo its sum
        assert np.linalg.norm(got - d) / np.linalg.norm(d) < 2e-2
        np.testing.assert_array_equal(np.asarray(o)[1], np.asarray(y)[1])
