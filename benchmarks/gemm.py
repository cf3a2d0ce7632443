"""A decode step's weight matmuls alone: separate q,k,v / gate,up GEMMs against fused ones, on XLA's
Triton GEMMs and on cuBLAS, by rows per step (which GEMM layout and backend the step should use).

    PYTHONPATH=. python benchmarks/gemm.py                      # GPU: writes $OUT/gemm.json
    PYTHONPATH=. python benchmarks/gemm.py --quick              # CPU smoke run, tiny shapes

Each variant runs every layer's projections over distinct weight buffers (nothing served from L2) with
a cheap norm between layers, timed in a device loop with dispatch removed. Floor = max(weight bytes /
the best copy rate of this run, flops / the measured bf16 matmul rate).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks.common import BF16, environment, floor_seconds, rooflines, timed, write_json

SHAPES = {  # hidden, q width, kv width, intermediate, layers
    "llama-7b": (4096, 4096, 4096, 11008, 32),
    "llama3-8b": (4096, 4096, 1024, 14336, 32),
    "tiny": (256, 256, 128, 512, 4),
}
BACKENDS = {"triton": None, "cublas": {"xla_gpu_enable_triton_gemm": False}}


def make_weights(shape, fused: bool, key):
    hidden, q_width, kv_width, inter, layers = shape
    layer_shapes = ({"qkv": (hidden, q_width + 2 * kv_width), "o": (q_width, hidden),
                     "gate_up": (hidden, 2 * inter), "down": (inter, hidden)} if fused else
                    {"q": (hidden, q_width), "k": (hidden, kv_width), "v": (hidden, kv_width), "o": (q_width, hidden),
                     "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)})
    out = []
    for _ in range(layers):
        layer = {}
        for name, s in layer_shapes.items():
            key, sub = jax.random.split(key)
            layer[name] = (jax.random.normal(sub, s, jnp.float32) * s[0] ** -0.5).astype(BF16)
        out.append(layer)
    return out


def layers_fn(shape, fused: bool):
    _, q_width, kv_width, inter, _ = shape

    def norm(x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(BF16)

    def run(x, weights):
        for w in weights:
            h = norm(x)
            if fused:
                qkv = h @ w["qkv"]
                q, k, v = qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:]
            else:
                q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
            # k and v feed the output weakly, so none of the three products is dead code
            attn = q + (1e-3 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))).astype(BF16)
            x = x + attn @ w["o"]
            h = norm(x)
            if fused:
                gu = h @ w["gate_up"]
                g, u = gu[:, :inter], gu[:, inter:]
            else:
                g, u = h @ w["gate"], h @ w["up"]
            x = x + (jax.nn.silu(g) * u) @ w["down"]
        return x

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-7b")
    ap.add_argument("--rows", default="1,32,64,128,256,512")
    ap.add_argument("--backends", default="triton,cublas")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new variants after this")
    args = ap.parse_args()
    if args.quick:
        args.models, args.rows, args.backends = "tiny", "1,32", "triton"
    t_start = time.perf_counter()
    roof = rooflines() if jax.default_backend() == "gpu" else {"hbm_bytes_per_s": 1e11, "matmul_flops_per_s": 1e12}
    results = []
    for model in args.models.split(","):
        shape = SHAPES[model]
        for fused in (False, True):
            weights = make_weights(shape, fused, jax.random.PRNGKey(0))
            nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights))
            params = sum(x.size for x in jax.tree_util.tree_leaves(weights))
            for rows in map(int, args.rows.split(",")):
                x = jax.random.normal(jax.random.PRNGKey(rows), (rows, shape[0]), jnp.float32).astype(BF16)
                for backend in args.backends.split(","):
                    if time.perf_counter() - t_start > args.budget_s:
                        print(f"budget spent: skipping {model} fused={fused} rows={rows} {backend}", flush=True)
                        continue
                    t0 = time.perf_counter()
                    seconds = timed(layers_fn(shape, fused), x, weights, compiler_options=BACKENDS[backend])
                    floor = floor_seconds(roof, nbytes, 2 * rows * params)
                    row = {"model": model, "layout": "fused" if fused else "separate", "rows": rows,
                           "backend": backend, "ms": seconds * 1e3, "floor_ms": floor * 1e3,
                           "x_floor": seconds / floor, "tb_s": nbytes / seconds / 1e12,
                           "tflop_s": 2 * rows * params / seconds / 1e12, "bench_s": time.perf_counter() - t0}
                    results.append(row)
                    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del weights
    write_json("gemm.json", {"environment": environment(), "roofline": roof, "results": results})
    print(f"\nroofline: copy {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {roof['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"{'model':>10} {'rows':>5} {'backend':>7} {'separate ms':>12} {'fused ms':>9} {'floor ms':>9} "
          f"{'fused TB/s':>10}")
    keyed = {(r["model"], r["rows"], r["backend"], r["layout"]): r for r in results}
    for (model, rows, backend, layout), r in keyed.items():
        if layout != "separate":
            continue
        f = keyed.get((model, rows, backend, "fused"))
        print(f"{model:>10} {rows:>5} {backend:>7} {r['ms']:>12.3f} {f['ms'] if f else float('nan'):>9.3f} "
              f"{r['floor_ms']:>9.3f} {f['tb_s'] if f else float('nan'):>10.2f}")


if __name__ == "__main__":
    main()
