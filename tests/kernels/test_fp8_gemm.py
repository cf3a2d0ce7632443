"""The FP8-weight GEMM kernel (interpret mode) against float64 over the same quantized weights."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jslora.model.quant import dequantize_weight, quantize_weight
from pallas_kernels.fp8_gemm import default_splits, fp8_gemm


@pytest.mark.parametrize("m, k, n, splits", [(1, 256, 384, None), (5, 128, 80, 2), (33, 512, 256, 4),
                                              (16, 64, 48, 1)])
@pytest.mark.parametrize("dtype, bound", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_fp8_gemm_matches_float64(rng, m, k, n, splits, dtype, bound):
    w = rng.normal(size=(k, n)) * rng.uniform(0.05, 2.0, size=n)
    weight, scale = quantize_weight(jnp.asarray(w, jnp.float32))
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    want = np.asarray(x, np.float64) @ np.asarray(dequantize_weight(weight, scale), np.float64)
    got = fp8_gemm(x, weight, scale, block_n=128, block_k=32, splits=splits, interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < bound, err


def test_splits_fill_the_grid_and_divide_k():
    assert default_splits(4096, 12288, 128, 128) == 2       # qkv: 96 column blocks, 2 slices: 192 programs
    assert default_splits(4096, 4096, 128, 128) == 8        # o: 32 column blocks
    assert default_splits(11008, 4096, 128, 128) == 2       # down: 86 K blocks split in 2, not 4
    with pytest.raises(ValueError, match="splits"):
        fp8_gemm(jnp.ones((1, 96)), *quantize_weight(jnp.ones((96, 32))), block_k=32, splits=2, interpret=True)
