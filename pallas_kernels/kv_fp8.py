"""FP8 keys and values in the unified pool (EngineConfig.kv_cache_dtype = "fp8", as vLLM's `fp8`).

The pool keeps the model's dtype (adapter rows share it), so a token's FP8 row is packed into pool words:
its W values (all KV heads side by side) as float8 e4m3, `itemsize` of them a word (2 in a bf16 pool, 4 in
a float32 one), lowest byte first: the keys in the row's first W / itemsize words, the values in the next
W / itemsize (value_offset), so one page holds a token's key and value, half the pages of the model's
dtype (bf16; a float32 pool, the CPU tests', leaves half of each row unused). Reading a KV head's D values
gives `itemsize` phases: phase p holds the head's elements p, p + itemsize, p + 2 itemsize, ... A kernel
works on phases throughout: q . k is the sum over phases of q_p . k_p, and p @ v gives the output's phases,
stored back interleaved, so no layout change is ever needed. Scale 1, saturating at +-448 (vLLM's default
when a checkpoint brings no KV scales): a tenant's extreme values saturate in its own rows only.

Every function here runs inside Pallas kernels (Triton and interpret mode) and in plain jnp alike. On the GPU,
kernels read a 16-bit pool's words with `unpack(..., hardware=True)`: one PTX instruction turns a word's two
FP8 values into two float16 (sm_89+), in place of a shift, a mask and a conversion per byte (the bit path was
7% slower in the decode attention on an H200; twenty-seventh session).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
_UINT = {2: jnp.uint16, 4: jnp.uint32}
# a word's two e4m3 values -> two float16 in one 32-bit word, the low byte's in the low half
_E4M3X2_TO_F16X2 = "cvt.rn.f16x2.e4m3x2 $0, $1;"


def phases_of(dtype) -> int:
    """FP8 values a word of a pool of `dtype` holds."""
    size = jnp.dtype(dtype).itemsize
    if size not in _UINT:
        raise ValueError(f"an FP8 KV cache packs into 16- or 32-bit pool words, not {jnp.dtype(dtype).name}")
    return size


def value_offset(width: int, phases: int) -> int:
    """Where a page row's FP8 values start, in pool words: after its keys."""
    return width // phases


def pack(phases, dtype):
    """phases[p] [..., n] (any float) -> [..., n] words of `dtype`: word j holds phase p's element j in byte p."""
    uint = _UINT[jnp.dtype(dtype).itemsize]
    word = None
    for p, x in enumerate(phases):
        byte = jax.lax.bitcast_convert_type(jnp.clip(x.astype(jnp.float32), -FP8_MAX, FP8_MAX).astype(FP8), jnp.uint8)
        shifted = byte.astype(uint) << (8 * p)
        word = shifted if word is None else word | shifted
    return jax.lax.bitcast_convert_type(word, dtype)


def compute_dtype(pool_dtype, dtype):
    """The dtype kernels compute an FP8 cache's dots in: float16 for a 16-bit pool (every e4m3 value is exact in
    it, and the hardware converts to it), else `dtype` (a float32 pool's tests)."""
    return jnp.float16 if jnp.dtype(pool_dtype).itemsize == 2 else dtype


def unpack(words, dtype=jnp.float32, *, hardware: bool = False) -> list:
    """pack's inverse: words [..., n] -> phases[p] [..., n] in `dtype` (float8 e4m3 values, exact in bf16 and
    float16). hardware: a 16-bit word's two values by one PTX conversion (inside Triton kernels only)."""
    size = jnp.dtype(words.dtype).itemsize
    uint = jax.lax.bitcast_convert_type(words, _UINT[size])
    if hardware and size == 2:
        [pair] = plgpu.elementwise_inline_asm(_E4M3X2_TO_F16X2, args=[uint], constraints="=r,h", pack=1,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct(uint.shape, jnp.int32)])
        halves = (pair & 0xFFFF, pair >> 16)   # the register's halves: no arithmetic left after the compiler
        return [jax.lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16).astype(dtype) for h in halves]
    return [jax.lax.bitcast_convert_type(((uint >> (8 * p)) & 0xFF).astype(jnp.uint8), FP8).astype(dtype)
            for p in range(size)]


def pack_rows(x, dtype):
    """Rows [..., W] -> their packed words [..., W / itemsize] (plain jnp: write paths outside kernels, tests)."""
    n = phases_of(dtype)
    return pack([x[..., p::n] for p in range(n)], dtype)


def unpack_rows(words, width: int):
    """Packed rows [..., >= width / itemsize] -> their W = width values [..., width] as float32 (plain jnp)."""
    n = phases_of(words.dtype)
    phases = unpack(words[..., : width // n])
    return jnp.stack(phases, axis=-1).reshape(*words.shape[:-1], width)
