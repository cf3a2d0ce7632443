"""Shared by the benchmark scripts: timing without dispatch overhead, and the GPU's rooflines."""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

BF16 = jnp.bfloat16


def timed(fn, carry, *args, min_loop_s=0.02, compiler_options: dict | None = None):
    """Seconds per call of carry = fn(carry, *args), dispatch removed: the loop is sized to run
    >= min_loop_s, then (t(2n) - t(n)) / n with the median of 5 of each. The trip count is an argument,
    so the loop compiles once whatever n. compiler_options: XLA's, for the loop's executable (e.g.
    {"xla_gpu_enable_triton_gemm": False})."""
    @functools.partial(jax.jit, compiler_options=compiler_options)
    def loop(n, carry, *args):
        return jax.lax.fori_loop(0, n, lambda i, c: fn(c, *args), carry)

    def run(n, reps=5):
        jax.block_until_ready(loop(n, carry, *args))  # compile + warm
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(loop(n, carry, *args))
            samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    n = 8
    while run(n, reps=1) < min_loop_s and n < 4096:
        n *= 4
    return max(run(2 * n) - run(n), 1e-9) / n


def wall_seconds_per_call(fn, first, *args, reps: int = 3, min_s: float = 0.2) -> float:
    """Wall seconds per call of out = fn(out, *args) from out = first, dispatch removed: n calls back to back
    (each call's output the next one's input), (t(2n) - t(n)) / n, the median of reps. For programs that must
    run as compiled (command-buffer modes), where `timed`'s loop around them would change them."""
    def run(n):
        out = first
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(out, *args)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    run(2)
    n = 4
    while run(n) < min_s and n < 4096:
        n *= 2
    return float(np.median([(run(2 * n) - run(n)) / n for _ in range(reps)]))


def _pallas_copy(x2d, rows_per_program: int, num_warps: int = 8, interpret: bool = False, aliased: bool = True):
    """A plain Pallas (Triton) copy of a [rows, 4096] array: each program reads rows_per_program rows
    and writes them back. In place (the output aliases the input): a fresh output, fed back as the timing
    loop's carry, made XLA add a copy of the whole buffer to each iteration, which halved the rate
    measured until the seventeenth session (2.05 TB/s)."""
    from jax.experimental import pallas as pl

    from pallas_kernels.triton_compat import pallas_call

    def kernel(x_ref, o_ref):
        rows = pl.ds(pl.program_id(0) * rows_per_program, rows_per_program)
        o_ref[rows, :] = x_ref[rows, :]

    return pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x2d.shape, x2d.dtype),
                       grid=(x2d.shape[0] // rows_per_program,), interpret=interpret, num_warps=num_warps,
                       input_output_aliases={0: 0} if aliased else None)(x2d)


def copy_rates(gib: float = 2.0) -> dict:
    """Device-to-device copy rates (bytes read + written per second) of several copies over a buffer of
    `gib` GiB (far beyond L2), each timed in a device loop with dispatch removed. The best is the
    roofline: what the GPU gives, not what one loop reaches."""
    n = int(gib * 2**30) // 2 // 4096 * 4096
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), BF16)
    variants = {
        "xla_bf16_negate": (lambda c: -c, x),
        "xla_u32_xor": (lambda c: c ^ jnp.uint32(1), jax.lax.bitcast_convert_type(x.reshape(-1, 2), jnp.uint32)),
        "xla_f32_scale": (lambda c: c * 1.0001, jax.lax.bitcast_convert_type(x.reshape(-1, 2), jnp.float32)),
    }
    if jax.default_backend() == "gpu":
        rows2d = x.reshape(-1, 4096)
        for rows, warps in ((1, 4), (8, 8), (32, 8)):
            variants[f"pallas_copy_{rows}rows"] = (lambda c, r=rows, w=warps: _pallas_copy(c, r, w), rows2d)
        # the old measurement (a fresh output: the loop copies it back), kept to show the difference
        variants["pallas_copy_8rows_fresh_output"] = (lambda c: _pallas_copy(c, 8, aliased=False), rows2d)
    rates = {}
    for name, (fn, arr) in variants.items():
        try:
            rates[name] = 2 * arr.nbytes / timed(fn, arr, min_loop_s=0.05)
        except Exception as e:  # noqa: BLE001 - a variant that does not lower is reported, not fatal
            rates[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
            dst = torch.empty_like(src)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(3):
                dst.copy_(src)
            samples = []
            for _ in range(20):
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            rates["torch_copy"] = 2 * src.numel() * 2 / float(np.median(samples))
            del src, dst
            torch.cuda.empty_cache()
    except ImportError:
        pass
    except RuntimeError as e:  # torch's OutOfMemoryError among them: XLA holds most of the GPU's memory, and a
        # few hundred MB held elsewhere leave torch no 2 GiB; the XLA and Pallas copies above still give the rate
        rates["torch_copy"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return rates


def rooflines() -> dict:
    """The GPU's ceilings, measured in this run: HBM bandwidth = the best device-to-device copy rate
    among copy_rates(), matmul = a bf16 8192^3 product. Floors are max(bytes / bandwidth, flops / rate)."""
    rates = copy_rates()
    numeric = {k: v for k, v in rates.items() if isinstance(v, float)}
    a = (jax.random.normal(jax.random.PRNGKey(1), (8192, 8192)) / 90.5).astype(BF16)  # keeps c @ a near 1
    mm_s = timed(lambda c, b: (c @ b).astype(BF16), a, a)
    best = max(numeric, key=numeric.get)
    return {"hbm_bytes_per_s": numeric[best], "hbm_source": best, "copy_rates": rates,
            "matmul_flops_per_s": 2 * 8192 ** 3 / mm_s}


def floor_seconds(roof: dict, bytes_moved: float, flops: float = 0.0) -> float:
    return max(bytes_moved / roof["hbm_bytes_per_s"], flops / roof["matmul_flops_per_s"])


def write_json(name: str, payload: dict) -> str:
    """Write results under $OUT (the device tool brings it back) or the working directory."""
    path = os.path.join(os.environ.get("OUT", "."), name)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def environment() -> dict:
    from jslora.provenance import commit

    return {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "commit": commit(),
            "date": time.strftime("%Y-%m-%d")}
