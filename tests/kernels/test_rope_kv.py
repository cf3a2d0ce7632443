"""pallas_kernels.rope_kv (rope and the K/V write in one pass) in interpret mode against the plain path:
apply_rope on q and k in float64, then the rows written where write_kv writes them."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jslora.model.layers import rope_cos_sin
from pallas_kernels.rope_kv import rope_write_kv

BOUND = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def rope64(x, cos, sin):
    """transformers' rotate_half rope in float64: x [N, H, D], cos/sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [
    (4, 4, 16),     # MHA
    (8, 2, 16),     # GQA: one block of key/value heads, four of queries' heads in blocks of two
    (40, 40, 8),    # 40 heads (Llama-13B): blocks of 8, not a power of two in all
    (12, 4, 32),    # group 3
])
def test_rope_write_kv_matches_rope_then_write(rng, dtype, heads, kv_heads, head_dim):
    tokens, layers, pages = 7, 2, 40
    layer = 1
    q, k, v = (rng.standard_normal((tokens, h, head_dim)).astype(np.float32) for h in (heads, kv_heads, kv_heads))
    positions = rng.integers(0, 500, tokens)
    cos, sin = (np.asarray(a[0], np.float64) for a in rope_cos_sin(jnp.asarray(positions)[None],
                                                                    1e4 ** -(np.arange(0, head_dim, 2) / head_dim)))
    pool = rng.standard_normal((layers * pages, kv_heads * head_dim)).astype(np.float32)
    pool.reshape(layers, pages, -1)[:, 0] = 0.0  # the null page
    k_pages = rng.permutation(np.arange(1, pages))[:tokens].astype(np.int32)
    v_pages = rng.permutation(np.arange(1, pages))[:tokens].astype(np.int32)
    k_pages[2] = v_pages[5] = 0   # padding rows: nothing written for them

    q_out, new_pool = rope_write_kv(*(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(cos, jnp.float32),
                                    jnp.asarray(sin, jnp.float32), jnp.asarray(pool, dtype), jnp.int32(layer),
                                    jnp.asarray(k_pages), jnp.asarray(v_pages), num_pages=pages, interpret=True)
    cast = [np.asarray(jnp.asarray(a, dtype), np.float64) for a in (q, k, v, pool)]
    expected_q = rope64(cast[0], cos, sin)
    expected_pool = cast[3].copy()
    base = layer * pages
    for t in range(tokens):
        if k_pages[t]:
            expected_pool[base + k_pages[t]] = rope64(cast[1][t:t + 1], cos[t:t + 1], sin[t:t + 1]).reshape(-1)
        if v_pages[t]:
            expected_pool[base + v_pages[t]] = cast[2][t].reshape(-1)
    new_pool = np.asarray(new_pool, np.float64)
    assert q_out.shape == q.shape and q_out.dtype == dtype
    err = np.linalg.norm(np.asarray(q_out, np.float64) - expected_q) / np.linalg.norm(expected_q)
    assert err < BOUND[dtype]
    written = np.abs(new_pool - expected_pool).max(axis=1)
    assert written.max() < 8 * BOUND[dtype] * np.abs(expected_pool).max()
    assert (new_pool.reshape(layers, pages, -1)[:, 0] == 0).all()            # the null page stays zero
    untouched = np.setdiff1d(np.arange(layers * pages), np.concatenate([base + k_pages, base + v_pages]))
    assert (new_pool[untouched] == cast[3][untouched]).all()                 # nothing else moves


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (8, 2, 16), (40, 40, 8)])
def test_rope_write_kv_fp8_matches_rope_then_fp8_write(rng, dtype, heads, kv_heads, head_dim):
    """With FP8 keys and values (pallas_kernels.kv_fp8), a token's both on one page: the same pool bits and
    the same q as apply_rope and then write_kv(kv_fp8=True)."""
    from jslora.model.layers import apply_rope
    from pallas_kernels.kv_write import write_kv

    tokens, layers, pages, layer = 7, 2, 40, 1
    q, k, v = (jnp.asarray(rng.standard_normal((tokens, h, head_dim)) * 3, dtype) for h in (heads, kv_heads, kv_heads))
    positions = jnp.asarray(rng.integers(0, 500, tokens))
    cos, sin = (a[0] for a in rope_cos_sin(positions[None], 1e4 ** -(np.arange(0, head_dim, 2) / head_dim)))
    pool = jnp.asarray(rng.standard_normal((layers * pages, kv_heads * head_dim)), dtype)
    pool = pool.reshape(layers, pages, -1).at[:, 0].set(0).reshape(pool.shape)
    token_pages = rng.permutation(np.arange(1, pages))[:tokens].astype(np.int32)
    token_pages[3] = 0   # a padding row
    token_pages = jnp.asarray(token_pages)
    q_out, fused = rope_write_kv(q, k, v, cos, sin, pool, jnp.int32(layer), token_pages, token_pages,
                                 num_pages=pages, kv_fp8=True, interpret=True)
    rotated_q, rotated_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    plain = write_kv(pool, jnp.int32(layer), token_pages, token_pages, rotated_k.reshape(tokens, -1),
                     v.reshape(tokens, -1), num_pages=pages, kv_fp8=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(q_out, np.float32), np.asarray(rotated_q, np.float32))
    np.testing.assert_array_equal(np.asarray(fused).view(np.uint8), np.asarray(plain).view(np.uint8))
    assert not np.array_equal(np.asarray(fused).view(np.uint8), np.asarray(pool).view(np.uint8))
