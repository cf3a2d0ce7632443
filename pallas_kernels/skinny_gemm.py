"""A GEMM for decode-sized row counts that streams the weights: y = x @ W (times a per-column scale for
FP8 weights), x [M, K] bf16 or f32 with M small (1-64), W bf16 or float8 e4m3.

At a few rows a projection is a read of its weights and nothing else, so the kernel is built to read
each weight byte once at close to the copy rate, up-casting in registers. Program (j, s) of the grid
(N / block_n, splits) owns output columns j * block_n .. and the s-th slice of K, walks its slice in
block_k steps and multiplies in one of three forms:

- "fma": no tensor cores. A [M, block_n, block_k] float32 accumulator of products, summed over K once at
  the end (1-4 rows: the product is cheap and a dot would pad the rows to 16).
- "xw": x as the dot's first operand, acc [R, block_n] += x [R, block_k] . W-tile (rows padded to R = 16+).
- "wx": the weight tile as the first operand, acc [block_n, R] += W-tile . x^T ("swap AB": on Hopper a
  tensor-core operand up-cast in registers can only be the first one; the second comes from shared
  memory).

With one K slice a program writes its finished columns (scaled, cast); with several it writes a float32
partial sum and XLA adds them (one small fused pass over splits x M x N). Weight layouts: "nk" ([N, K],
K contiguous: jslora.model.quant's FP8 weights) and "kn" ([K, N]: the bf16 weights as the model stores
them, [in, out]).

Measured on the H200 (benchmarks/RESULTS.md, "Sixth session"): on bf16 weights it ties XLA's Triton GEMM
(94% of the copy rate on the largest projections); FP8 weights it reads at 35-70% of the copy rate in every
form and dot type, as XLA's GEMMs do. So the engine uses it only when fp8_gemm names it.

Launch parameters come from a tuning file per GPU kind (`tuned/skinny_gemm_<device>.json`, written by
`benchmarks/gemm_tune.py`, as vLLM keeps its tuned kernel configs), keyed by weight dtype, layout, (K, N)
and the smallest tuned row count >= M; arguments passed override it.
"""
from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.triton_compat import (
    contract_last,
    contract_middle,
    dot,
    load,
    pallas_call,
    power_of_two_block,
    resolve_interpret,
    store,
)

FORMS = ("fma", "xw", "wx")
LAYOUTS = ("nk", "kn")
FMA_MAX_ROWS = 4  # the fma form's accumulator holds M x block_n x block_k floats
DOT_ROWS = 16     # tensor-core dots need 16 rows
DEFAULTS = {"form": "xw", "block_n": 64, "block_k": 256, "splits": 1, "num_warps": 4, "num_stages": 3,
            "dot_dtype": "x"}
TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")


def tuning_file(device_kind: str) -> str:
    kind = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
    return os.path.join(TUNED_DIR, f"skinny_gemm_{kind}.json")


@functools.cache
def _tuned_entries(device_kind: str) -> tuple:
    try:
        with open(tuning_file(device_kind)) as f:
            return tuple(json.load(f)["entries"])
    except FileNotFoundError:
        return ()


def tuning_key(dtype, layout: str, k: int, n: int, activations: str = "x") -> dict:
    """activations: "x" (as given) or "fp8" (quantized per row: skinny_gemm's dot_dtype float8_e4m3fn)."""
    return {"dtype": jnp.dtype(dtype).name, "layout": layout, "k": k, "n": n, "activations": activations}


def tuned_config(m: int, k: int, n: int, dtype=jnp.bfloat16, layout: str = "kn",
                 device_kind: str | None = None, activations: str = "x") -> dict:
    """The tuned launch parameters for [m, k] x a [k, n] weight of this dtype and layout on this GPU kind
    (DEFAULTS, with fma for few rows, where no entry has this shape): the entry with the smallest row
    count >= m, else the largest."""
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    key = tuning_key(dtype, layout, k, n, activations)
    same = sorted((e for e in _tuned_entries(kind) if all(e.get(f, "x") == v for f, v in key.items())),
                  key=lambda e: e["rows"])
    if not same:
        return {**DEFAULTS, "form": "fma" if m <= FMA_MAX_ROWS and activations == "x" else DEFAULTS["form"]}
    entry = next((e for e in same if e["rows"] >= m), same[-1])
    config = {**DEFAULTS, **entry["config"]}
    if config["form"] == "fma" and m > FMA_MAX_ROWS:
        config["form"] = DEFAULTS["form"]
    return config


def padded_rows(m: int, form: str) -> int:
    """Rows the kernel computes: a power of two (Triton's blocks), at least 16 for the dot forms."""
    rows = 1 << (m - 1).bit_length()
    return rows if form == "fma" else max(DOT_ROWS, rows)


# the dot's operand types besides "x" (weights up-cast to x's dtype): "float16" (FP8 weights convert to
# float16 in one hardware instruction per pair, and x is scaled per row into float16's range: weight-only
# numerics, x rounded to 11 bits instead of bf16's 8) and "float8_e4m3fn" (x quantized per row, each row its
# own scale, as jslora.model.quant.quantize_rows: an FP8 x FP8 dot, no conversion of the weights at all)
DOT_DTYPES = ("x", "float16", "float8_e4m3fn")
ROW_TARGET = {"float16": 2.0 ** 14, "float8_e4m3fn": 448.0}  # a row's largest magnitude after scaling


@functools.partial(jax.jit, static_argnames=("layout", "form", "block_n", "block_k", "splits", "num_warps",
                                             "num_stages", "dot_dtype", "interpret"))
def skinny_gemm(x, weight, scale=None, *, layout: str = "kn", form: str | None = None, block_n: int | None = None,
                block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, dot_dtype: str | None = None, interpret: bool | None = None):
    """x [M, K] @ weight ([K, N] for layout "kn", [N, K] for "nk"), times scale [N] if given -> [M, N] in
    x's dtype, float32 accumulation. dot_dtype (DOT_DTYPES): "float8_e4m3fn" quantizes x per row (FP8
    activations: a choice of numerics, so never taken from the tuning file); otherwise the tuned choice
    between "x" and "float16". Launch parameters left None come from the tuning file."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    m, k = x.shape
    n = weight.shape[0] if layout == "nk" else weight.shape[1]
    if weight.shape != ((n, k) if layout == "nk" else (k, n)):
        raise ValueError(f"weight {weight.shape} does not fit x {x.shape} in layout {layout!r}")
    activations = "fp8" if dot_dtype == "float8_e4m3fn" else "x"
    given = {"form": form, "block_n": block_n, "block_k": block_k, "splits": splits, "num_warps": num_warps,
             "num_stages": num_stages, "dot_dtype": dot_dtype}
    config = {**tuned_config(m, k, n, weight.dtype, layout, activations=activations),
              **{f: v for f, v in given.items() if v is not None}}
    form, dot_dtype = config["form"], config["dot_dtype"]
    if dot_dtype == "float16" and x.dtype == jnp.float32 and given["dot_dtype"] is None:
        dot_dtype = "x"  # tuned for bf16 activations; float32 ones keep their precision
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if dot_dtype not in DOT_DTYPES:
        raise ValueError(f"dot_dtype must be one of {DOT_DTYPES}, got {dot_dtype!r}")
    if form == "fma" and (m > FMA_MAX_ROWS or dot_dtype != "x"):
        raise ValueError(f"the fma form takes at most {FMA_MAX_ROWS} rows and no dot_dtype, got {m}, {dot_dtype}")
    block_n = power_of_two_block(n, cap=config["block_n"])
    block_k = power_of_two_block(k, cap=config["block_k"])
    if form != "fma" and min(block_n, block_k) < DOT_ROWS:
        raise ValueError(f"the {form} form's tiles need >= {DOT_ROWS} columns and K, got {block_n} x {block_k}")
    splits = config["splits"]
    if (k // block_k) % splits:
        raise ValueError(f"splits {splits} must divide K's {k // block_k} blocks of {block_k}")
    steps = k // block_k // splits
    rows = padded_rows(m, form)
    x_rows = jnp.pad(x, ((0, rows - m), (0, 0))) if rows > m else x
    compute = jnp.float32 if form == "fma" else (x.dtype if dot_dtype == "x" else jnp.dtype(dot_dtype))
    kn = layout == "kn"
    row_scaled = dot_dtype != "x"

    def kernel(x_ref, w_ref, *rest):
        out_ref = rest[-1]
        j, s = pl.program_id(0), pl.program_id(1)
        columns = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        live = jnp.arange(rows)[:, None] < m  # padding rows are neither read nor written

        def x_tile(i):
            k_slice = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            return load(x_ref.at[:, k_slice], mask=jnp.broadcast_to(live, (rows, block_k)), other=0).astype(
                jnp.float32)

        if row_scaled:  # every program scales a row by the whole row's largest magnitude
            amax = jax.lax.fori_loop(0, k // block_k, lambda i, a: jnp.maximum(
                a, jnp.max(jnp.abs(x_tile(i)), axis=1, keepdims=True)), jnp.zeros((rows, 1), jnp.float32))
            x_scale = jnp.where(amax > 0, amax / ROW_TARGET[dot_dtype], 1.0)
            inverse = 1.0 / x_scale

        def body(i, acc):
            step = s * steps + i
            k_slice = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
            xs = x_tile(step)
            if row_scaled:
                target = ROW_TARGET[dot_dtype]
                xs = jnp.clip(xs * inverse, -target, target)
            xs = xs.astype(compute)
            w = (w_ref[k_slice, columns] if kn else w_ref[columns, k_slice]).astype(compute)
            if form == "fma":  # products only; the sum over K waits for the end
                return acc + (xs[:, :, None] * w[None] if kn else xs[:, None, :] * w[None])
            if form == "xw":
                return acc + (contract_middle(xs, w) if kn else contract_last(xs, w))
            return acc + (dot(w, xs, trans_a=True, trans_b=True) if kn else contract_last(w, xs))

        acc_shape = {"fma": (rows, block_k, block_n) if kn else (rows, block_n, block_k),
                     "xw": (rows, block_n), "wx": (block_n, rows)}[form]
        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(acc_shape, jnp.float32))
        y = {"fma": lambda a: a.sum(axis=1 if kn else 2), "xw": lambda a: a, "wx": lambda a: a.T}[form](acc)
        if row_scaled:
            y = y * x_scale
        live_out = jnp.broadcast_to(live, (rows, block_n))
        if splits > 1:
            store(out_ref.at[s, :, columns], y, mask=live_out)
            return
        if scale is not None:
            y = y * rest[0][columns][None, :]
        store(out_ref.at[:, columns], y.astype(out_ref.dtype), mask=live_out)

    operands = (x_rows, weight) + ((scale.astype(jnp.float32),) if scale is not None and splits == 1 else ())
    out_shape = (jax.ShapeDtypeStruct((splits, rows, n), jnp.float32) if splits > 1 else
                 jax.ShapeDtypeStruct((rows, n), x.dtype))
    out = pallas_call(kernel, out_shape=out_shape, grid=(n // block_n, splits),
                      interpret=resolve_interpret(interpret),
                      num_warps=config["num_warps"], num_stages=config["num_stages"],
                      name=f"skinny_gemm_{form}")(*operands)
    if splits == 1:
        return out[:m]
    y = out[:, :m].sum(axis=0)
    return (y * scale if scale is not None else y).astype(x.dtype)
