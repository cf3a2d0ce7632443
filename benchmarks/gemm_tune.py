"""Tunes pallas_kernels/skinny_gemm.py on this GPU: for each projection shape of a model (fused q,k,v and
gate,up), each weight precision (bf16 stored [in, out], FP8 stored [out, in]) and each row bucket, a
staged search over the kernel's form, tiles, warps, pipeline stages and K splits, beside XLA's own GEMM
for the same product. Winners go to the kernel's tuning file for this GPU kind
(pallas_kernels/tuned/skinny_gemm_<device>.json, read at trace time) and, with every timing, to
$OUT/gemm_tune.json.

    PYTHONPATH=. python benchmarks/gemm_tune.py --models llama-3-8b --rows 1,16 --budget-s 400
    PYTHONPATH=. python benchmarks/gemm_tune.py --quick      # CPU smoke run (interpret mode, tiny)

Each timing multiplies over enough distinct weight copies (>= --min-bytes in all) that nothing is served
from L2, each product followed by a tiny consumer (as in a step). Candidates are compiled in parallel,
then timed one by one: a device loop, best of three runs; the table's final figures are re-timed with
dispatch removed (benchmarks/common.timed). TB/s = weight bytes / time, against this run's copy rate.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp

from benchmarks.common import BF16, environment, rooflines, timed, write_json
from jslora.model.quant import FP8, fp8_matmul, quantize_weight
from pallas_kernels.skinny_gemm import FMA_MAX_ROWS, skinny_gemm, tuning_file, tuning_key

SHAPES = {  # (K, N) of qkv, o, gate_up, down
    "llama-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama-3-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
    "tiny": [(256, 512), (512, 256)],
}
# weights' dtype and layout, and the activations: "x" as given, "fp8" quantized per row (fp8a8: w8a8)
# (fp8kn: FP8 weights stored [in, out] like the bf16 ones, a layout the engine does not use: is it faster?)
PRECISIONS = {"fp8": (FP8, "nk", "x"), "fp8a8": (FP8, "nk", "fp8"), "bf16": (BF16, "kn", "x"),
              "fp8kn": (FP8, "kn", "x")}
STAGE1 = {"block_n": (32, 64, 128), "block_k": (128, 256)}
# the dot's operand type tried per precision (pallas_kernels.skinny_gemm.DOT_DTYPES); fp8a8's is fixed
DOT_DTYPES = {"fp8": ("x", "float16"), "fp8a8": ("float8_e4m3fn",), "bf16": ("x",), "fp8kn": ("x", "float16")}
STAGE2 = ([{"block_k": 512}, {"block_n": 16}, {"block_n": 256}] + [{"num_warps": w} for w in (2, 8)]
          + [{"num_stages": s} for s in (2, 4, 6)] + [{"splits": s} for s in (2, 4)])
FMA_MAX_ELEMENTS = 16384  # fma's accumulator per program (rows x block_n x block_k floats)


@functools.cache
def weight_copies(precision: str, k: int, n: int, min_bytes: float) -> list:
    """Distinct weights of one shape and precision (made once per shape, not per config timed)."""
    dtype = PRECISIONS[precision][0]
    copies = max(1, int(-(-min_bytes // (k * n * jnp.dtype(dtype).itemsize))))
    out = []
    for i in range(copies):
        w = jax.random.normal(jax.random.PRNGKey(i), (k, n), jnp.float32) * k ** -0.5
        if dtype != FP8:
            out.append((w.astype(BF16), None))
            continue
        weight, scale = quantize_weight(w)
        out.append((weight.T, scale) if PRECISIONS[precision][1] == "kn" else (weight, scale))
    return out


def loop_fn(product, copies: int):
    """carry -> carry over every weight copy: each product feeds a tiny consumer into the next input."""
    def fn(c, ws):
        for w, s in ws[:copies]:
            y = product(c, w, s)
            c = c + (1e-6 * jnp.sum(y[:, :8].astype(jnp.float32), -1, keepdims=True)).astype(c.dtype)
        return c
    return fn


def kernel_product(layout: str, config: dict):
    return lambda x, w, s: skinny_gemm(x, w, s, layout=layout, **config)


def xla_product(precision: str):
    if precision == "bf16":
        return lambda x, w, s: x @ w
    if precision == "fp8kn":  # weights [in, out], up-cast
        return lambda x, w, s: (jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * s).astype(x.dtype)
    return lambda x, w, s: fp8_matmul(x, w, s, activations=precision == "fp8a8")


class Problem:
    """One (precision, rows, K, N): compile candidates in parallel, time them one by one."""

    def __init__(self, precision: str, rows: int, k: int, n: int, min_bytes: float):
        self.precision, self.rows, self.k, self.n = precision, rows, k, n
        self.weights = weight_copies(precision, k, n, min_bytes)
        self.x = jax.random.normal(jax.random.PRNGKey(99), (rows, k), jnp.float32).astype(BF16)
        per_call = k * n * jnp.dtype(PRECISIONS[precision][0]).itemsize / 2e12 + 4e-6
        on_gpu = jax.default_backend() == "gpu"  # elsewhere (interpret mode) a smoke run: two iterations
        self.iterations = max(2, int(0.015 / (per_call * len(self.weights)))) if on_gpu else 2

    def compile(self, product):
        @jax.jit
        def loop(c, ws):
            return jax.lax.fori_loop(0, self.iterations, lambda i, c: loop_fn(product, len(ws))(c, ws), c)
        return loop.lower(self.x, self.weights).compile()

    def time(self, executable) -> float:
        jax.block_until_ready(executable(self.x, self.weights))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(executable(self.x, self.weights))
            best = min(best, time.perf_counter() - t0)
        return best / self.iterations / len(self.weights)

    def accurate(self, product) -> float:
        """Seconds per product with dispatch removed (common.timed: (t(2n) - t(n)) / n)."""
        return timed(loop_fn(product, len(self.weights)), self.x, self.weights, min_loop_s=0.01) / len(self.weights)


def candidates_stage1(precision: str, rows: int) -> list[dict]:
    forms = [(f, d) for f in ("xw", "wx") for d in DOT_DTYPES[precision]]
    if rows <= FMA_MAX_ROWS and "x" in DOT_DTYPES[precision]:
        forms.insert(0, ("fma", "x"))
    out = []
    for (form, dot_dtype), (block_n, block_k) in itertools.product(forms, itertools.product(*STAGE1.values())):
        config = {"form": form, "block_n": block_n, "block_k": block_k, "splits": 1, "num_warps": 4,
                  "num_stages": 3, "dot_dtype": dot_dtype}
        if form != "fma" or rows * block_n * block_k <= FMA_MAX_ELEMENTS:
            out.append(config)
        elif form == "fma" and block_n == 32:  # keep fma's widest K at a narrower column block
            out.append({**config, "block_n": 16})
    return out


def valid(config: dict, rows: int, k: int, n: int) -> bool:
    if config["form"] == "fma" and config["dot_dtype"] != "x":
        return False
    if config["block_n"] > n or config["block_k"] > k or (k // config["block_k"]) % config["splits"]:
        return False
    if config["form"] == "fma":
        return rows * config["block_n"] * config["block_k"] <= FMA_MAX_ELEMENTS
    return config["block_n"] >= 16


def tune(problem: Problem, args, log: list) -> dict | None:
    tried: dict[str, float | None] = {}
    layout = PRECISIONS[problem.precision][1]

    def run_batch(configs):
        configs = [c for c in configs if valid(c, problem.rows, problem.k, problem.n)
                   and json.dumps(c, sort_keys=True) not in tried]
        if not configs or time.perf_counter() > args.deadline:
            return
        with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
            futures = {json.dumps(c, sort_keys=True): pool.submit(problem.compile, kernel_product(layout, c))
                       for c in configs}
        for key, future in futures.items():
            try:
                seconds = problem.time(future.result())
            except Exception as e:  # noqa: BLE001 - a config Triton cannot build (shared memory, registers) is skipped
                tried[key] = None
                log.append({**problem_key(problem), "config": json.loads(key), "error": repr(e)[:200]})
                continue
            tried[key] = seconds
            log.append({**problem_key(problem), "config": json.loads(key), "us": seconds * 1e6})

    run_batch(candidates_stage1(problem.precision, problem.rows))
    for _ in range(2):  # two rounds of single changes around the two best so far
        ranked = sorted((s, json.loads(c)) for c, s in tried.items() if s)
        run_batch([{**base, **change} for _, base in ranked[:2] for change in STAGE2])
    ranked = sorted((s, json.loads(c)) for c, s in tried.items() if s)
    return ranked[0][1] if ranked else None


def problem_key(problem: Problem) -> dict:
    return {"precision": problem.precision, "rows": problem.rows, "k": problem.k, "n": problem.n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3-8b")
    ap.add_argument("--precisions", default="fp8,fp8a8,bf16", help=", ".join(PRECISIONS))
    ap.add_argument("--rows", default="1,16", help="row buckets (M rows use the smallest bucket >= M)")
    ap.add_argument("--budget-s", type=float, default=400, help="stop trying new configs after this")
    ap.add_argument("--min-bytes", type=float, default=160e6)
    ap.add_argument("--compile-threads", type=int, default=8)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models, args.rows, args.min_bytes, args.budget_s = "tiny", "1,16", 1e5, 60
        STAGE1.update(block_n=(32,), block_k=(128,))
        STAGE2[:] = [{"splits": 2}]
    on_gpu = jax.default_backend() == "gpu"
    roof = rooflines() if on_gpu else {"hbm_bytes_per_s": 1e11, "matmul_flops_per_s": 1e12}
    args.deadline = time.perf_counter() + args.budget_s
    log, best = [], []
    shapes = list(dict.fromkeys(s for m in args.models.split(",") for s in SHAPES[m]))
    order = [(p, r, s) for p in args.precisions.split(",") for r in map(int, args.rows.split(",")) for s in shapes]
    for precision, rows, (k, n) in order:
        if time.perf_counter() > args.deadline:
            print(f"budget spent: {precision} rows={rows} {k}x{n} not tuned", flush=True)
            continue
        problem = Problem(precision, rows, k, n, args.min_bytes)
        config = tune(problem, args, log)
        if config is None:
            continue
        entry = {**problem_key(problem), "config": config}
        if on_gpu:
            entry["us"] = problem.accurate(kernel_product(PRECISIONS[precision][1], config)) * 1e6
            entry["xla_us"] = problem.accurate(xla_product(precision)) * 1e6
            weight_bytes = k * n * jnp.dtype(PRECISIONS[precision][0]).itemsize
            entry["tb_s"] = weight_bytes / entry["us"] / 1e6
            entry["of_copy"] = entry["tb_s"] * 1e12 / roof["hbm_bytes_per_s"]
        best.append(entry)
        print(entry, flush=True)
        write_json("gemm_tune.json", {"environment": environment(), "roofline": roof, "entries": best, "sweep": log})
    weight_copies.cache_clear()
    kind = jax.devices()[0].device_kind
    if on_gpu and best:  # the kernel reads this file from now on (merged with shapes tuned before)
        path = tuning_file(kind)
        old = json.load(open(path))["entries"] if os.path.exists(path) else []

        def key_of(e):
            dtype, layout, act = (PRECISIONS[e["precision"]] if "precision" in e else
                                  (e["dtype"], e["layout"], e.get("activations", "x")))
            return (e["rows"], *tuning_key(dtype, layout, e["k"], e["n"], act).values())

        new = [{**tuning_key(*PRECISIONS[e["precision"]][:2], e["k"], e["n"], PRECISIONS[e["precision"]][2]),
                "rows": e["rows"], "config": e["config"], "us": e["us"]} for e in best]
        keys = {key_of(e) for e in new}
        merged = [e for e in old if key_of(e) not in keys] + new
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"device": kind, "environment": environment(), "entries": merged}, f, indent=1)
        print(f"wrote {path}")
    write_json("gemm_tune.json", {"environment": environment(), "roofline": roof, "entries": best, "sweep": log})
    copy = roof["hbm_bytes_per_s"] / 1e12
    print(f"\nroofline: copy {copy:.2f} TB/s ({len(log)} configs timed)")
    print(f"{'prec':>5} {'rows':>4} {'K':>6} {'N':>6} {'XLA us':>7} {'ours us':>7} {'TB/s':>5} {'of copy':>7}  config")
    for e in best:
        if "us" not in e:
            print(e)
            continue
        c = e["config"]
        print(f"{e['precision']:>5} {e['rows']:>4} {e['k']:>6} {e['n']:>6} {e['xla_us']:>7.1f} {e['us']:>7.1f} "
              f"{e['tb_s']:>5.2f} {e['of_copy']:>7.0%}  {c['form']} {c['dot_dtype']} n{c['block_n']} "
              f"k{c['block_k']} s{c['splits']} w{c['num_warps']} st{c['num_stages']}")


if __name__ == "__main__":
    main()
