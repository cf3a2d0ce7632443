"""The skinny GEMM kernel (interpret mode) against float64: every form, both weight layouts, bf16 and
FP8 weights (FP8 against the same quantized weights), one or several K slices, ragged row counts."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jslora.model.quant import dequantize_weight, quantize_rows, quantize_weight
from pallas_kernels import skinny_gemm as module
from pallas_kernels.skinny_gemm import skinny_gemm


def _problem(rng, m, k, n, dtype, weights):
    w = rng.normal(size=(k, n)) * rng.uniform(0.05, 2.0, size=n)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    if weights in ("fp8", "fp8kn"):  # stored [N, K] (or [K, N]) with a scale per output column
        weight, scale = quantize_weight(jnp.asarray(w, jnp.float32))
        reference = np.asarray(dequantize_weight(weight, scale), np.float64)
        return (x, weight, scale, "nk", reference) if weights == "fp8" else (x, weight.T, scale, "kn", reference)
    weight = jnp.asarray(w, dtype)
    reference = np.asarray(weight, np.float64)
    if weights == "nk":
        return x, weight.T, None, "nk", reference
    return x, weight, None, "kn", reference


@pytest.mark.parametrize("form, m", [("fma", 1), ("fma", 3), ("xw", 1), ("xw", 5), ("xw", 33), ("wx", 2),
                                     ("wx", 16)])
@pytest.mark.parametrize("weights", ["fp8", "fp8kn", "kn", "nk"])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype, bound", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_skinny_gemm_matches_float64(rng, form, m, weights, splits, dtype, bound):
    k, n = 128, 96
    x, weight, scale, layout, reference = _problem(rng, m, k, n, dtype, weights)
    want = np.asarray(x, np.float64) @ reference
    got = skinny_gemm(x, weight, scale, layout=layout, form=form, block_n=32, block_k=32, splits=splits,
                      interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < bound, err


@pytest.mark.parametrize("form", ["xw", "wx"])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("splits", [1, 2])
def test_float16_and_fp8_dots_match_their_references(rng, form, m, splits):
    """dot_dtype float16: FP8 weights up-cast to float16 and x scaled per row into its range (weight-only
    numerics, x rounded to 11 bits); float8_e4m3fn: x quantized per row as quant.quantize_rows does, an
    FP8 x FP8 product. Rows of very different magnitudes, so a row scaled by another's scale would show."""
    k, n = 256, 64
    x, weight, scale, layout, reference = _problem(rng, m, k, n, jnp.bfloat16, "fp8")
    x = (x.astype(jnp.float32) * jnp.asarray(10.0 ** rng.uniform(-3, 3, size=(m, 1)), jnp.float32)).astype(x.dtype)
    x64 = np.asarray(x, np.float64)
    xq, x_scale = quantize_rows(x)
    want = {"float16": x64 @ reference,
            "float8_e4m3fn": (np.asarray(xq, np.float64) * np.asarray(x_scale, np.float64)) @ reference}
    # bf16 rows often land exactly on FP8 rounding ties, which the kernel (x times 1/scale, compiled) and
    # quantize_rows (x / scale, eager) may round apart, one FP8 step each: so the FP8 bound adds the row's own
    # quantization error to bf16's. A row quantized with another row's scale is off by far more.
    quantization = np.linalg.norm(want["float8_e4m3fn"] - x64 @ reference, axis=1) / np.linalg.norm(
        x64 @ reference, axis=1)
    for dot_dtype, bound in (("float16", 1e-2), ("float8_e4m3fn", 1e-2 + quantization)):
        got = skinny_gemm(x, weight, scale, layout=layout, form=form, block_n=32, block_k=64, splits=splits,
                          dot_dtype=dot_dtype, interpret=True)
        assert got.shape == (m, n) and got.dtype == x.dtype
        got64, ref = np.asarray(got, np.float64), want[dot_dtype]
        per_row = np.linalg.norm(got64 - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert (per_row < bound).all(), (dot_dtype, per_row, bound)
    # FP8 activations are a different product than weight-only, visibly but slightly
    fp8_err = np.linalg.norm(want["float8_e4m3fn"] - want["float16"]) / np.linalg.norm(want["float16"])
    assert 1e-3 < fp8_err < 0.1


def test_bad_launches_are_refused():
    x, w = jnp.ones((1, 96)), jnp.ones((96, 32))
    with pytest.raises(ValueError, match="splits"):
        skinny_gemm(x, w, block_k=32, splits=2, interpret=True)
    with pytest.raises(ValueError, match="at most"):
        skinny_gemm(jnp.ones((8, 96)), w, form="fma", interpret=True)
    with pytest.raises(ValueError, match="does not fit"):
        skinny_gemm(x, w, layout="nk", interpret=True)
    with pytest.raises(ValueError, match="no dot_dtype"):
        skinny_gemm(x, w, form="fma", dot_dtype="float16", interpret=True)
    with pytest.raises(ValueError, match="dot_dtype must"):
        skinny_gemm(x, w, form="xw", dot_dtype="int8", interpret=True)
    with pytest.raises(ValueError, match="tiles need"):
        skinny_gemm(x, jnp.ones((96, 8)), form="xw", interpret=True)


def test_tuned_configs_are_read_per_device_dtype_layout_shape_and_row_bucket(tmp_path, monkeypatch, rng):
    """The tuning file benchmarks/gemm_tune.py writes: weight dtype, layout, (K, N) and the smallest tuned
    row count >= M pick the launch parameters; untuned shapes and GPUs get the defaults (fma for few
    rows); an fma entry is not used past its rows; results stay exact."""
    monkeypatch.setattr(module, "TUNED_DIR", str(tmp_path))
    module._tuned_entries.cache_clear()
    key = module.tuning_key(jnp.bfloat16, "kn", 256, 128)
    entries = [{**key, "rows": 1, "config": {"form": "fma", "block_n": 16, "block_k": 64}},
               {**key, "rows": 16, "config": {"form": "wx", "block_n": 64, "block_k": 64, "splits": 2}},
               {**key, "rows": 64, "config": {"form": "xw", "block_n": 128, "block_k": 32, "num_warps": 8}}]
    (tmp_path / "skinny_gemm_test_gpu_x1.json").write_text(json.dumps({"entries": entries}))
    try:
        def tuned(m, k=256, dtype=jnp.bfloat16, layout="kn", kind="Test GPU x1"):
            return module.tuned_config(m, k, 128, dtype, layout, kind)
        assert tuned(1)["form"] == "fma" and tuned(1)["block_k"] == 64
        assert tuned(2)["form"] == "wx" and tuned(16)["splits"] == 2
        assert tuned(17)["num_warps"] == 8
        assert tuned(500)["block_k"] == 32                                   # past the largest: the largest
        assert tuned(1, k=512) == {**module.DEFAULTS, "form": "fma"}         # shape not tuned
        assert tuned(8, k=512) == module.DEFAULTS
        assert tuned(1, dtype=jnp.float8_e4m3fn)["form"] == "fma" and tuned(1, layout="nk")["block_k"] == 256
        assert tuned(1, kind="Other GPU")["block_k"] == module.DEFAULTS["block_k"]  # no file for this GPU
        assert module.tuned_config(1, 256, 128, jnp.bfloat16, "kn", "Test GPU x1", activations="fp8") == \
            module.DEFAULTS  # FP8 activations are tuned apart (and never by fma)
        x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(256, 128)), jnp.float32)
        monkeypatch.setattr(module, "tuned_config", lambda *a, **kw: {**module.DEFAULTS, **entries[1]["config"]})
        got = module.skinny_gemm(x, w, interpret=True)
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        assert np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want) < 1e-5
    finally:
        module._tuned_entries.cache_clear()
