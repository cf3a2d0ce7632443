"""Tunes pallas_kernels/fp8_gemm.py on this GPU: for each weight shape of a model's (fused) projections
and each row bucket, a staged search over tile sizes, warps, K splits and pipeline stages; the winners
are written to the kernel's tuning file for this GPU kind (pallas_kernels/tuned/fp8_gemm_<device>.json,
read by fp8_gemm at trace time) and, with every timing, to $OUT/fp8_gemm_tune.json.

    PYTHONPATH=. python benchmarks/fp8_gemm_tune.py --models llama-7b --rows 16,64
    PYTHONPATH=. python benchmarks/fp8_gemm_tune.py --quick      # CPU smoke run (interpret mode, tiny)

Each timing multiplies over enough distinct weight copies (> 256 MB in all) that nothing is served from
L2, in a device loop with dispatch removed; TB/s = FP8 weight bytes / time, against the best copy rate
of this run (benchmarks/common.rooflines).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp

from benchmarks.common import BF16, environment, rooflines, timed, write_json
from jslora.model.quant import quantize_weight
from pallas_kernels.fp8_gemm import default_splits, fp8_gemm, tuning_file

SHAPES = {  # (K, N) of qkv, o, gate_up, down
    "llama-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama-3-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
    "tiny": [(256, 512), (512, 256)],
}
STAGE1 = {"block_n": (128, 256), "block_k": (128, 256, 512), "num_warps": (4, 8)}
STAGE2 = [{"num_stages": s} for s in (2, 4, 5)] + [{"split_factor": f} for f in (0.5, 2)]


@functools.cache
def weight_copies(k: int, n: int, min_bytes: float) -> list:
    """Distinct quantized weights of one shape, made once per shape (not per config timed)."""
    copies = max(1, int(-(-min_bytes // (k * n))))
    return [quantize_weight(jax.random.normal(jax.random.PRNGKey(i), (k, n), jnp.float32) * k ** -0.5)
            for i in range(copies)]


def time_config(rows: int, k: int, n: int, config: dict, min_bytes: float) -> float:
    weights = weight_copies(k, n, min_bytes)
    copies = len(weights)
    x = jax.random.normal(jax.random.PRNGKey(99), (rows, k), jnp.float32).astype(BF16)

    def fn(c, ws):
        for w, s in ws:  # a weak feedback keeps every product live and the calls in order
            y = fp8_gemm(c, w, s, **config)
            c = c + (1e-6 * jnp.sum(y[:, :8].astype(jnp.float32), -1, keepdims=True)).astype(c.dtype)
        return c

    return timed(fn, x, weights, min_loop_s=0.01) / copies


def resolve(config: dict, k: int, n: int) -> dict:
    """A search point -> fp8_gemm's arguments (split_factor scales the default number of K splits)."""
    out = {key: v for key, v in config.items() if key != "split_factor"}
    splits = default_splits(k, n, min(out["block_n"], n), min(out["block_k"], k))
    factor = config.get("split_factor", 1)
    splits = max(1, int(splits * factor))
    if (k // min(out["block_k"], k)) % splits:
        raise ValueError("split does not divide K")
    out["splits"] = splits
    return out


def tune_shape(rows: int, k: int, n: int, args, log) -> dict | None:
    tried = {}

    def attempt(config):
        try:
            launch = resolve(config, k, n)
        except ValueError:
            return
        key = json.dumps(launch, sort_keys=True)
        if key in tried or time.perf_counter() > args.deadline:
            return
        try:
            seconds = time_config(rows, k, n, launch, args.min_bytes)
        except Exception as e:  # noqa: BLE001 - a config Triton cannot build (shared memory, registers) is skipped
            tried[key] = None
            log.append({"rows": rows, "k": k, "n": n, "config": launch, "error": repr(e)[:200]})
            return
        tried[key] = seconds
        row = {"rows": rows, "k": k, "n": n, "config": launch, "us": seconds * 1e6,
               "tb_s": k * n / seconds / 1e12}
        log.append(row)
        print(row, flush=True)

    for values in itertools.product(*STAGE1.values()):
        attempt({**dict(zip(STAGE1, values)), "num_stages": 3})
    done = sorted(((s, json.loads(c)) for c, s in tried.items() if s), key=lambda t: t[0])
    for _, base in done[:2]:
        for change in STAGE2:
            attempt({**base, **change})
    done = sorted(((s, json.loads(c)) for c, s in tried.items() if s), key=lambda t: t[0])
    if not done:
        return None
    seconds, best = done[0]
    return {"rows": rows, "k": k, "n": n, "config": best, "us": seconds * 1e6, "tb_s": k * n / seconds / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-7b")
    ap.add_argument("--rows", default="16,64", help="row buckets (a product of M rows uses the smallest >= M)")
    ap.add_argument("--budget-s", type=float, default=300, help="stop trying new configs after this")
    ap.add_argument("--min-bytes", type=float, default=256e6)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models, args.rows, args.min_bytes, args.budget_s = "tiny", "16", 1e5, 60
        STAGE1.update(block_n=(128,), block_k=(128,), num_warps=(4,))
        STAGE2[:] = STAGE2[-1:]
    on_gpu = jax.default_backend() == "gpu"
    roof = rooflines() if on_gpu else {"hbm_bytes_per_s": 1e11, "matmul_flops_per_s": 1e12}
    args.deadline = time.perf_counter() + args.budget_s
    log, best = [], []
    for model in args.models.split(","):
        for k, n in SHAPES[model]:
            for rows in map(int, args.rows.split(",")):
                default = time_config(rows, k, n, {}, args.min_bytes) if on_gpu else float("nan")
                entry = tune_shape(rows, k, n, args, log)
                if entry:
                    entry["default_us"] = default * 1e6
                    best.append(entry)
            weight_copies.cache_clear()  # the next shape's copies replace these
    kind = jax.devices()[0].device_kind
    payload = {"device": kind, "environment": environment(), "roofline": roof, "entries": best, "sweep": log}
    if on_gpu and best:  # the kernel reads this file from now on (merged with shapes tuned before)
        path = tuning_file(kind)
        old = json.load(open(path))["entries"] if os.path.exists(path) else []
        keys = {(e["rows"], e["k"], e["n"]) for e in best}
        merged = [e for e in old if (e["rows"], e["k"], e["n"]) not in keys] + best
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"device": kind, "environment": environment(), "entries": merged}, f, indent=1)
        print(f"wrote {path}")
    write_json("fp8_gemm_tune.json", payload)
    copy = roof["hbm_bytes_per_s"] / 1e12
    print(f"\nroofline: copy {copy:.2f} TB/s")
    print(f"{'K':>6} {'N':>6} {'rows':>5} {'default us':>10} {'best us':>8} {'TB/s':>6} {'of copy':>7}  config")
    for e in best:
        print(f"{e['k']:>6} {e['n']:>6} {e['rows']:>5} {e['default_us']:>10.1f} {e['us']:>8.1f} {e['tb_s']:>6.2f} "
              f"{e['tb_s'] / copy:>7.0%}  {e['config']}")


if __name__ == "__main__":
    main()
