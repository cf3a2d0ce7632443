"""Paged prefill attention: causal attention of a step's prompt chunks over their sequences' cached prefixes and
themselves, on the unified pool (the decode kernel and the shared pieces: pallas_kernels.attention)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.attention import (
    _NEG,
    _load_kv,
    _load_q,
    _online_softmax_step,
    _scores,
    _store_phases,
    _zero_rows,
)
from pallas_kernels.kv_fp8 import compute_dtype, phases_of
from pallas_kernels.triton_compat import cdiv, div, pallas_call, resolve_interpret


def _prefill_kernel(layer_ref, seq_ref, pos_ref, len_ref, kp_ref, vp_ref, q_ref, pool_ref, o_ref, *, tile, group,
                    head_dim, block, num_pages, max_context, num_rows, scale, phases, hardware_fp8):
    t, head = pl.program_id(0), pl.program_id(1)
    base = layer_ref[0] * num_pages
    seq, start = seq_ref[t], pos_ref[t]
    length = len_ref[seq]
    q_rows = pl.ds(head * num_rows + t * tile, tile)
    dtype = compute_dtype(pool_ref.dtype, q_ref.dtype) if phases > 1 else q_ref.dtype
    q = _load_q(q_ref, q_rows, head_dim, phases, scale, dtype)   # [tile, D / phases] each
    q_pos = start + jnp.arange(tile)
    kv_head = div(head, group)

    def body(i, carry):
        k_pos = i * block + jnp.arange(block)
        k = _load_kv(pool_ref, base + kp_ref[pl.ds(seq * max_context + i * block, block)], kv_head, head_dim, phases,
                     dtype, False, hardware_fp8)
        v = _load_kv(pool_ref, base + vp_ref[pl.ds(seq * max_context + i * block, block)], kv_head, head_dim, phases,
                     dtype, True, hardware_fp8)
        valid = k_pos < length   # the tile's padding rows may see past the end; real rows never do
        scores = jnp.where((k_pos[None, :] <= q_pos[:, None]) & valid[None, :], _scores(q, k), _NEG)
        return _online_softmax_step(carry, scores, [_zero_rows(x, valid) for x in v])

    init = (jnp.full((tile,), _NEG, jnp.float32), jnp.zeros((tile,), jnp.float32),
            tuple(jnp.zeros((tile, head_dim // phases), jnp.float32) for _ in range(phases)))
    _, l, accs = jax.lax.fori_loop(0, cdiv(start + tile, block), body, init)
    if phases == 1:
        o_ref[q_rows, :] = (accs[0] / l[:, None]).astype(o_ref.dtype)
    else:
        _store_phases(o_ref, q_rows.start + jnp.arange(tile), [acc / l[:, None] for acc in accs], head_dim,
                      jnp.full((tile,), True))


@functools.partial(jax.jit, static_argnames=("num_pages", "tile", "block", "kv_fp8", "interpret"))
def paged_prefill_attention(q, pool, layer, tile_seq, tile_pos, seq_lens, k_pages, v_pages, *, num_pages: int,
                            tile: int = 16, block: int = 16, kv_fp8: bool = False, interpret: bool | None = None):
    """Causal attention of new tokens over their sequence's cached prefix and themselves.

    q [N, Hq, D]: tokens in tiles of `tile` rows, each tile within one sequence: tile i holds the
    tokens at positions tile_pos[i] .. + tile - 1 of sequence tile_seq[i] (rows past the sequence's
    end are padding and come out as garbage). seq_lens [S]: each sequence's tokens (keys past it are
    masked, whatever their pages hold). K/V of these tokens must already be in their pages (write_kv).
    Page tables as for decode, covering at least tile_pos + tile tokens. kv_fp8 as for decode. -> [N, Hq, D]."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[1] // head_dim
    max_context = k_pages.shape[1]
    assert rows % tile == 0 and max_context % block == 0
    interpret = resolve_interpret(interpret)
    kernel = functools.partial(
        _prefill_kernel, tile=tile, group=num_heads // num_kv_heads, head_dim=head_dim, block=block,
        num_pages=num_pages, max_context=max_context, num_rows=rows, scale=head_dim ** -0.5,
        phases=phases_of(pool.dtype) if kv_fp8 else 1, hardware_fp8=not interpret)
    head_major = jnp.swapaxes(q, 0, 1).reshape(num_heads * rows, head_dim)
    call = pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(head_major.shape, q.dtype),
                       grid=(rows // tile, num_heads),
                       interpret=interpret, name="paged_prefill_attention")
    out = call(jnp.reshape(layer, (1,)).astype(jnp.int32), tile_seq, tile_pos, seq_lens, k_pages.reshape(-1),
               v_pages.reshape(-1), head_major, pool)
    return jnp.swapaxes(out.reshape(num_heads, rows, head_dim), 0, 1)
