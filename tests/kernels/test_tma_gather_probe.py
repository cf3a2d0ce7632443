"""benchmarks/tma_gather_probe.py's Mosaic GPU kernel (TMA copies of pool blocks at gathered rows through an
emit_pipeline) in Mosaic GPU's interpret mode, against the gathered blocks' sum in numpy; and its GPU path
lowered for CUDA on this CPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.kernel_ir import gpu_lowering
from benchmarks.tma_gather_probe import gather_sum, reference


def test_tma_gather_sums_the_blocks_at_the_given_rows(rng):
    rank, block_k, programs, steps, pool_blocks = 8, 128, 3, 5, 40
    pool = jnp.asarray(rng.standard_normal((pool_blocks * rank, 256)), jnp.bfloat16)
    starts = rng.integers(1, pool_blocks, (programs, steps)).astype(np.int32)
    got = np.asarray(gather_sum(pool, jnp.asarray(starts), rows=rank, block_k=block_k, programs=programs, stages=2,
                                interpret=True))
    want = reference(pool, starts, rank, block_k)
    assert got.shape == (programs, rank, block_k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # other rows give other sums: the check would see a kernel that read the wrong blocks
    assert np.abs(reference(pool, (starts + 1) % pool_blocks, rank, block_k) - want).max() > 1.0


def test_tma_gather_of_single_rows(rng):
    """One row a copy (each rank row on a page of its own)."""
    programs, steps, pool_rows = 2, 6, 50
    pool = jnp.asarray(rng.standard_normal((pool_rows, 256)), jnp.bfloat16)
    starts = rng.integers(1, pool_rows, (programs, steps)).astype(np.int32)
    got = np.asarray(gather_sum(pool, jnp.asarray(starts), rows=1, block_k=128, programs=programs, stages=2,
                                interpret=True))
    np.testing.assert_allclose(got, reference(pool, starts, 1, 128), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, block_k", [(8, 128), (8, 256), (1, 128)])
def test_tma_gather_lowers_for_the_gpu(rows, block_k):
    """The GPU path (explicit register layouts, which interpret mode skips) lowers through Mosaic GPU on this CPU:
    a layout it rejects fails here, not in a device call."""
    S = jax.ShapeDtypeStruct
    fn = functools.partial(gather_sum, rows=rows, block_k=block_k, programs=132, stages=4)
    assert "mosaic_gpu" in gpu_lowering(fn, S((4096, 4096), jnp.bfloat16), S((132, 42), jnp.int32))


def test_shrink_forms_all_match_the_oracle():
    """The probe's S1 comparison at tiny shapes: the engine's LoRA, and the Mosaic GPU shrink before the Triton
    expand or the Mosaic GPU one, all give the problem's float64 deltas."""
    from benchmarks.tma_gather_probe import shrink_forms

    rows = shrink_forms(True, [128], [2])
    assert [r["form"].split()[0] for r in rows] == ["engine", "mgpu", "mgpu"]
    assert all("error" not in r and r["rel_err"] < 2e-2 for r in rows), rows
