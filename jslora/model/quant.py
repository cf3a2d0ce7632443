"""FP8 base weights: float8 e4m3 with one float32 scale per output channel, and the matmul over them.

A quantized projection `name` of a layer is stored as lp[name] (float8_e4m3fn [*out, in]) beside
lp[name + "_scale"] (float32 [*out]), with weight * scale ~ the bf16 weight (scale = the column's
largest magnitude / 448, e4m3's largest finite value). Norms, embeddings, the LM head and every LoRA
adapter stay in the model's dtype: adapters trained on the bf16 base apply unchanged.

The matmul either up-casts the weights inside the GEMM and keeps activations in bf16 (weight-only:
exact up to accumulation order against the same quantized weights), or also quantizes each activation
row with its own scale and runs an FP8 x FP8 GEMM (activations=True).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
QUANTIZATIONS = (None, "fp8")
# how FP8 projections multiply (EngineConfig.fp8_gemm): by the step's rows (auto, below); XLA's GEMM with
# the weights up-cast and bf16 activations; XLA's FP8 x FP8 GEMM with activations quantized per row; our
# Pallas kernel (pallas_kernels.skinny_gemm) for few rows, weight-only or with activations quantized per row
FP8_GEMMS = ("auto", "xla", "xla-w8a8", "pallas", "pallas-w8a8")
# The default: FP8 activations, each row quantized by its own largest magnitude, in every step (vLLM's FP8
# on Hopper does the same). Measured on the H200 (benchmarks/RESULTS.md): weight-only up-casts the weights
# and is 1.9x slower than bf16 at 256 rows, so S1 at saturation (steps of 200-600 rows) ran at 0.80x
# bf16's throughput with it; FP8 x FP8 is 1.1-1.2x faster than bf16 at 256 rows and loses 8-9% to
# weight-only at 1 row. One numerics for every step, unlike "auto": a row's result never depends on how
# many other tenants' rows share its step.
DEFAULT_FP8_GEMM = "xla-w8a8"
SCALE_SUFFIX = "_scale"
# the layer weights that are quantized (plain and fused layouts: jslora.model.llama)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")


def quantize_weight(w) -> tuple[jax.Array, jax.Array]:
    """w [in, *out] -> (FP8 weight [*out, in], float32 scale [*out]): one scale per output channel, the
    weight stored with K contiguous (XLA's FP8 GEMMs on Hopper take it without a transpose pass, and
    read it 1.3x faster than bf16 at 1-32 rows; benchmarks/RESULTS.md)."""
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=0) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: any scale reproduces it
    return jnp.moveaxis((w32 / scale).astype(FP8), 0, -1), scale


def dequantize_weight(weight, scale, dtype=jnp.float32):
    """The weights [in, *out] a quantized projection stands for (the plain reference of the FP8 matmul)."""
    return (jnp.moveaxis(weight, -1, 0).astype(jnp.float32) * scale).astype(dtype)


def quantize_rows(x, row_max=None):
    """Activations [..., in] -> (FP8 [..., in], float32 scale [..., 1]): each row its own scale.
    row_max: under tensor parallelism, when x holds one device's slice of each row (the row-parallel o and
    down projections), the max over the devices' slices, so every device scales by the whole row's max
    and the product equals one device's (jslora.model.paged passes a pmax)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = (amax if row_max is None else row_max(amax)) / FP8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    return (x32 / scale).astype(FP8), scale


def fp8_matmul(x, weight, scale, activations: bool = False, row_max=None):
    """x [..., in] @ (weight [*out, in] * scale [*out]) -> [..., *out] in x's dtype, accumulated in
    float32. activations: x is quantized per row too (an FP8 x FP8 GEMM; row_max: quantize_rows');
    else weights are up-cast."""
    out_dims = weight.ndim - 1
    dims = (((x.ndim - 1,), (weight.ndim - 1,)), ((), ()))
    if activations:
        xq, x_scale = quantize_rows(x, row_max)
        y = jax.lax.dot_general(xq, weight, dims, preferred_element_type=jnp.float32)
        y = y * x_scale.reshape(x_scale.shape[:-1] + (1,) * out_dims)
    else:
        y = jax.lax.dot_general(x, weight.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


# fp8_gemm="auto": steps of fewer rows than this up-cast the weights, larger ones quantize the activations
# too. Measured on the H200 (benchmarks/RESULTS.md, engine.py device ms, bf16 / weight-only / FP8 x FP8):
# Llama-3-8B batch 1 4.63 / 3.83 / 4.18, batch 32 6.24 / 4.91 / 4.43, batch 256 9.68 / 18.08 / 8.21;
# Llama-7B batch 1 4.64 / 4.66 / 5.05, batch 32 5.43 / 4.48 / 5.17. Quantizing the rows costs kernels a
# few-row step does not win back; at 256 rows the up-cast weights make the GEMM compute-bound in bf16.
# Not the default: under "auto" a request's numerics depend on how many rows share its step (other
# tenants' load), which the weight-only default never lets happen.
FP8_ACTIVATIONS_FROM_ROWS = 64


def fp8_matmul_by_rows(x, weight, scale, row_max=None):
    """fp8_matmul, with the activations quantized from FP8_ACTIVATIONS_FROM_ROWS rows (fp8_gemm="auto")."""
    rows = x.size // x.shape[-1]
    return fp8_matmul(x, weight, scale, activations=rows >= FP8_ACTIVATIONS_FROM_ROWS, row_max=row_max)


# steps with up to this many rows run FP8 projections on pallas_kernels.skinny_gemm when chosen
# (EngineConfig.fp8_gemm = "pallas" or "pallas-w8a8"); larger ones are compute-bound enough for XLA's GEMM
FP8_KERNEL_MAX_ROWS = 64


def fp8_matmul_with_kernel(x, weight, scale, interpret=None, row_max=None, activations: bool = False):
    """fp8_matmul through our skinny GEMM for up to FP8_KERNEL_MAX_ROWS rows, XLA's above, with the same
    numerics either way: weights up-cast (the kernel may take float16 for the dot: x keeps 11 bits), or
    with activations, each row quantized by its own largest magnitude. Under tensor parallelism a
    row-parallel projection's rows are split over devices (row_max given): XLA's GEMM, whose quantization
    takes the max over the devices."""
    from pallas_kernels.skinny_gemm import skinny_gemm

    k = x.shape[-1]
    rows = x.size // k
    if rows > FP8_KERNEL_MAX_ROWS or (activations and row_max is not None):
        return fp8_matmul(x, weight, scale, activations=activations, row_max=row_max)
    y = skinny_gemm(x.reshape(rows, k), weight.reshape(-1, k), scale.reshape(-1), layout="nk",
                    dot_dtype="float8_e4m3fn" if activations else None, interpret=interpret)
    return y.reshape(*x.shape[:-1], *weight.shape[:-1])


def is_quantized(lp: dict) -> bool:
    """Whether a layer's params hold FP8 projections."""
    return any(name.endswith(SCALE_SUFFIX) for name in lp)


def quantize_params(params: dict, shardings=None) -> dict:
    """Quantize every layer's projections in place, one layer at a time (each bf16 weight is freed as
    its FP8 copy is made, if nothing else holds it). shardings(name) -> (weight, scale) placements
    under tensor parallelism, or None. Layers already quantized are left as they are. Returns params."""
    jitted = {}
    for lp in params["layers"]:
        if is_quantized(lp):
            continue
        for name in [n for n in PROJECTIONS if n in lp]:
            if name not in jitted:
                out = shardings(name) if shardings is not None else None
                jitted[name] = jax.jit(quantize_weight, out_shardings=out)
            lp[name], lp[name + SCALE_SUFFIX] = jitted[name](lp.pop(name))
    return params
