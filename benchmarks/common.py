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


def timed(fn, carry, *args, min_loop_s=0.02):
    """Seconds per call of carry = fn(carry, *args), dispatch removed: the loop is sized to run
    >= min_loop_s, then (t(2n) - t(n)) / n with the median of 5 of each."""
    @functools.partial(jax.jit, static_argnums=0)
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


def rooflines() -> dict:
    x = jax.random.normal(jax.random.PRNGKey(0), (512 * 1024 * 1024,), BF16)  # 1 GiB: far beyond L2
    scale = jax.jit(lambda c: c * 1.0001)  # one call moves 2 GiB: dispatch is noise next to it
    jax.block_until_ready(scale(x))
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(scale(x))
        samples.append(time.perf_counter() - t0)
    copy_s = float(np.median(samples))
    a = (jax.random.normal(jax.random.PRNGKey(1), (8192, 8192)) / 90.5).astype(BF16)  # keeps c @ a near 1
    mm_s = timed(lambda c, b: (c @ b).astype(BF16), a, a)
    return {"hbm_bytes_per_s": 2 * x.nbytes / copy_s, "matmul_flops_per_s": 2 * 8192 ** 3 / mm_s}


def write_json(name: str, payload: dict) -> str:
    """Write results under $OUT (the device tool brings it back) or the working directory."""
    path = os.path.join(os.environ.get("OUT", "."), name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def environment() -> dict:
    import subprocess

    # JSLORA_COMMIT first: the lent GPU gets a copy of the working tree whose git metadata can lag
    commit = os.environ.get("JSLORA_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
    return {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d")}
