"""pallas_kernels.rms_norm (the residual add and RMSNorm in one pass) in interpret mode against float64."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jslora.model.layers import rms_norm
from pallas_kernels.rms_norm import add_rms_norm

BOUND = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def rms_norm64(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [
    (1, 1, 64),     # a decode row: one program
    (1, 7, 80),     # a width that is not a power of two (Llama-13B's 5120): a masked 128-wide block
    (1, 67, 64),    # many rows
    (70, 48),       # no batch dimension
])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_float64(rng, dtype, shape, with_delta):
    # rows of very different sizes: each row is scaled by its own norm
    x = rng.standard_normal(shape) * rng.uniform(0.01, 30.0, size=(*shape[:-1], 1))
    delta = rng.standard_normal(shape) * 0.5
    weight = rng.uniform(0.2, 2.0, shape[-1])
    eps = 1e-5
    cast = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, delta, weight)]
    total, out = add_rms_norm(jnp.asarray(x, dtype), jnp.asarray(delta, dtype) if with_delta else None,
                              jnp.asarray(weight, dtype), eps=eps, interpret=True)
    expected_total = cast[0] + cast[1] if with_delta else cast[0]
    expected = rms_norm64(expected_total, cast[2], eps)
    assert total.shape == out.shape == shape and total.dtype == out.dtype == dtype
    # the sum is rounded to the dtype once, as x + delta is
    np.testing.assert_allclose(np.asarray(total, np.float64), expected_total, rtol=BOUND[dtype] / 2, atol=0)
    rows = expected.reshape(-1, shape[-1])
    err = np.linalg.norm(np.asarray(out, np.float64).reshape(rows.shape) - rows, axis=1) / np.linalg.norm(rows, axis=1)
    assert err.max() < BOUND[dtype]
    # and the same numbers as the model's own rms_norm after the same add (what the engine's default runs)
    plain_total = jnp.asarray(x, dtype) + jnp.asarray(delta, dtype) if with_delta else jnp.asarray(x, dtype)
    plain = rms_norm(plain_total, jnp.asarray(weight, dtype), eps)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(plain_total))
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(plain, np.float64),
                               rtol=BOUND[dtype], atol=BOUND[dtype] * np.abs(expected).max())


def test_a_hostile_row_changes_no_other_row(rng):
    """Rows of NaN, Inf and 1e30 (a hostile tenant's) beside normal rows: every other row's sum and norm are
    what they are without them."""
    rows, width = 70, 64
    x = rng.standard_normal((rows, width)).astype(np.float32)
    delta = rng.standard_normal((rows, width)).astype(np.float32)
    weight = jnp.asarray(rng.uniform(0.2, 2.0, width), jnp.float32)
    clean = add_rms_norm(jnp.asarray(x), jnp.asarray(delta), weight, eps=1e-5, interpret=True)
    hostile = {1: np.nan, 2: np.inf, 5: 1e30, 69: -np.inf}
    for row, value in hostile.items():
        x[row, rng.integers(width)] = value
    total, out = add_rms_norm(jnp.asarray(x), jnp.asarray(delta), weight, eps=1e-5, interpret=True)
    others = np.setdiff1d(np.arange(rows), list(hostile))
    for got, want in zip((total, out), clean):
        np.testing.assert_array_equal(np.asarray(got)[others], np.asarray(want)[others])
