"""FP8 base weights: float8 e4m3 with one float32 scale per output channel, and the matmul over them.

A quantized projection is {"weight": float8_e4m3fn [in, *out], "scale": float32 [*out]} with
weight * scale ~ the bf16 weight (scale = the column's largest magnitude / 448, e4m3's largest
finite value). The matmul either up-casts the weights inside the GEMM and keeps activations in
bf16 (weight-only: exact up to accumulation order against the same quantized weights), or also
quantizes each activation row with its own scale and runs an FP8 x FP8 GEMM (activations=True).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value


def quantize_weight(w) -> dict:
    """w [in, *out] -> {"weight": FP8 [in, *out], "scale": float32 [*out]} (per output channel)."""
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=0) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: any scale reproduces it
    return {"weight": (w32 / scale).astype(FP8), "scale": scale}


def dequantize_weight(q: dict, dtype=jnp.float32):
    """The weights a quantized projection stands for (the plain reference of the FP8 matmul)."""
    return (q["weight"].astype(jnp.float32) * q["scale"]).astype(dtype)


def quantize_rows(x):
    """Activations [..., in] -> (FP8 [..., in], float32 scale [..., 1]): each row its own scale."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return (x32 / scale).astype(FP8), scale


def fp8_matmul(x, weight, scale, activations: bool = False):
    """x [..., in] @ (weight [in, *out] * scale [*out]) -> [..., *out] in x's dtype, accumulated in
    float32. activations: x is quantized per row too (an FP8 x FP8 GEMM); else weights are up-cast."""
    out_dims = weight.ndim - 1
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if activations:
        xq, x_scale = quantize_rows(x)
        y = jax.lax.dot_general(xq, weight, dims, preferred_element_type=jnp.float32)
        y = y * x_scale.reshape(x_scale.shape[:-1] + (1,) * out_dims)
    else:
        y = jax.lax.dot_general(x, weight.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def is_quantized(w) -> bool:
    return isinstance(w, dict) and "weight" in w and "scale" in w
