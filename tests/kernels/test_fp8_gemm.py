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


def test_tuned_configs_are_read_per_device_kind_shape_and_row_bucket(tmp_path, monkeypatch, rng):
    """The tuning file benchmarks/fp8_gemm_tune.py writes: (K, N) and the smallest tuned row count >= M
    pick the launch parameters; untuned shapes and GPUs get the defaults; results stay exact."""
    from pallas_kernels import fp8_gemm as module

    monkeypatch.setattr(module, "TUNED_DIR", str(tmp_path))
    module._tuned_entries.cache_clear()
    entries = [{"rows": 16, "k": 256, "n": 128, "config": {"block_n": 64, "block_k": 64, "splits": 2}},
               {"rows": 64, "k": 256, "n": 128, "config": {"block_n": 128, "block_k": 32, "num_warps": 8}}]
    (tmp_path / "fp8_gemm_test_gpu_x1.json").write_text(__import__("json").dumps({"entries": entries}))
    try:
        assert module.tuned_config(1, 256, 128, "Test GPU x1")["block_k"] == 64
        assert module.tuned_config(16, 256, 128, "Test GPU x1")["splits"] == 2
        assert module.tuned_config(17, 256, 128, "Test GPU x1")["num_warps"] == 8
        assert module.tuned_config(500, 256, 128, "Test GPU x1")["block_k"] == 32   # past the largest: largest
        assert module.tuned_config(1, 512, 128, "Test GPU x1") == module.DEFAULTS    # shape not tuned
        assert module.tuned_config(1, 256, 128, "Other GPU") == module.DEFAULTS      # no file for this GPU
        monkeypatch.setattr(module, "tuned_config", lambda m, k, n: {**module.DEFAULTS, **entries[0]["config"]})
        w = rng.normal(size=(256, 128))
        weight, scale = quantize_weight(jnp.asarray(w, jnp.float32))
        x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
        want = np.asarray(x, np.float64) @ np.asarray(dequantize_weight(weight, scale), np.float64)
        got = module.fp8_gemm(x, weight, scale, interpret=True)
        assert np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want) < 1e-5
    finally:
        module._tuned_entries.cache_clear()
