"""The projection with the LoRA expand in its epilogue (pallas_kernels.gemm_expand), interpret mode, against
float64 numpy: x @ W plus each row's (x @ A) @ B from the adapters' dense weights."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gemm_expand import gemm_expand, gemm_expand_reference, v_by_row
from pallas_kernels.lora_shrink import lora_shrink
from pallas_kernels.problems import gathered_tiles, lora_group_problem

BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def row_shrink(p, max_rank):
    """v [M, T * max_rank]: each row's x @ A_t, gathered from the pool (what the shrink gives, by row)."""
    pool, base = p["pool"].astype(np.float64), int(p["layer"]) * p["num_pages"]
    x = p["x"].astype(np.float64)
    parts = []
    for t, pages in enumerate(p["a_pages"]):
        rows = pool[base + pages]                                               # [M, chunks, R, W]
        a_t = np.moveaxis(rows, 1, 2).reshape(x.shape[0], max_rank, -1)[:, :, : x.shape[1]]
        live = np.arange(max_rank)[None, :] < p["tile_rank"][:, t: t + 1]
        parts.append(np.einsum("mi,mri->mr", x, a_t) * live)
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("widths", [(64, 32, 32), (32,)])
def test_gemm_expand_mixed_ranks(rng, dtype, widths):
    # GQA-like q, k, v (q spans two 32-wide pages) and a single target; ranks mixed, some targets untouched,
    # some rows without an adapter; rows 0 .. 31 in two row blocks, so both blocks' rank walks differ
    in_features, max_rank, rows = 64, 16, 32
    ranks = [[4, 8, 0], [16, 0, 3], [1, 1, 1], [8, 16, 8]]
    ranks = [r[: len(widths)] for r in ranks]
    adapters = [None if rng.random() < 0.25 else int(rng.integers(len(ranks))) for _ in range(rows)]
    p = lora_group_problem(rng, num_layers=2, page_width=32, in_features=in_features, out_features=list(widths),
                           adapter_ranks=ranks, tile_adapters=adapters, max_rank=max_rank)
    w = rng.standard_normal((in_features, sum(widths)), dtype=np.float32) * in_features ** -0.5
    v = row_shrink(p, max_rank)
    args = dict(widths=tuple(widths), num_pages=p["num_pages"])
    tables = (jnp.asarray(p["tile_rank"]), jnp.asarray(np.concatenate(p["b_pages"], axis=1)))
    x, w_, pool = (jnp.asarray(a, dtype) for a in (p["x"], w, p["pool"]))
    ours = gemm_expand(x, w_, jnp.asarray(v, jnp.float32), pool, jnp.asarray(p["layer"]), *tables,
                       block_m=16, block_n=16, block_k=32, interpret=True, **args)
    ref = gemm_expand_reference(x, w_, jnp.asarray(v, jnp.float32), pool, p["layer"], *tables, **args)
    oracle = np.asarray(x, np.float64) @ np.asarray(w_, np.float64) + np.concatenate(p["deltas"], axis=1)
    assert np.abs(np.concatenate(p["deltas"], axis=1)).max() > 0.1  # the LoRA part is there to be checked
    for out in (np.asarray(ours, np.float64), np.asarray(ref, np.float64)):
        assert np.isfinite(out).all()
        assert np.linalg.norm(out - oracle) <= BOUND[dtype] * np.linalg.norm(oracle)
    # without v: the plain GEMM
    plain = gemm_expand(x, w_, None, pool, jnp.asarray(p["layer"]), None, None, block_m=16, block_n=16,
                        block_k=32, interpret=True, **args)
    base = np.asarray(x, np.float64) @ np.asarray(w_, np.float64)
    assert np.linalg.norm(np.asarray(plain, np.float64) - base) <= BOUND[dtype] * np.linalg.norm(base)


def test_v_by_row_from_gathered_tiles(rng):
    # the shrink over decode tiles (rows grouped by adapter, one-row tiles unsplit, others split over K) gives,
    # by row, what each row's x @ A is: the input gemm_expand takes
    widths, max_rank, rows = (32, 32), 16, 24
    adapters = [None if rng.random() < 0.2 else int(rng.integers(5)) for _ in range(rows)]
    p = lora_group_problem(rng, num_layers=2, page_width=32, in_features=64, out_features=list(widths),
                           adapter_ranks=[[8, 4], [16, 0], [2, 2], [8, 8], [0, 16]], tile_adapters=adapters,
                           max_rank=max_rank)
    tile_rows, tile_rank, a_pages, _ = gathered_tiles(p, num_tiles=rows, tokens_per_tile=16)
    v = lora_shrink(jnp.asarray(p["x"]), jnp.asarray(p["pool"]), jnp.asarray(p["layer"]), jnp.asarray(tile_rank),
                    jnp.asarray(np.concatenate(a_pages, axis=2)), jnp.asarray(tile_rows), num_pages=p["num_pages"],
                    tokens_per_tile=16, k_splits=2, mask_rank=True, interpret=True)
    by_row = np.asarray(v_by_row(v, jnp.asarray(tile_rows), jnp.asarray(tile_rank), rows), np.float64)
    expected = row_shrink(p, max_rank)
    live = np.repeat(p["tile_rank"] > 0, max_rank, axis=1)  # a target a row's adapter lacks: never read
    np.testing.assert_allclose(by_row[live], expected[live], rtol=1e-4, atol=1e-4)
    assert np.abs(expected[live]).max() > 0.1
