"""A decode step's weight matmuls alone: separate q,k,v / gate,up GEMMs against fused ones, on XLA's
Triton GEMMs and on cuBLAS, by rows per step (which GEMM layout and backend the step should use); with
--precisions, FP8 weights too: w8 (float8 e4m3 weights with per-output-channel scales, up-cast inside
the GEMM, bf16 activations), w8a8 (activations quantized per token as well, an FP8 x FP8 GEMM); w8k and bf16k
run FP8 and bf16 weights through our kernel, pallas_kernels/skinny_gemm.py (tuned by gemm_tune.py).

    PYTHONPATH=. python benchmarks/gemm.py                      # GPU: writes $OUT/gemm.json
    PYTHONPATH=. python benchmarks/gemm.py --quick              # CPU smoke run, tiny shapes
    PYTHONPATH=. python benchmarks/gemm.py --layouts fused --precisions bf16,w8,w8a8

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
from jslora.model.quant import fp8_matmul, quantize_weight
from pallas_kernels.skinny_gemm import skinny_gemm

SHAPES = {  # hidden, q width, kv width, intermediate, layers
    "llama-7b": (4096, 4096, 4096, 11008, 32),
    "llama3-8b": (4096, 4096, 1024, 14336, 32),
    "tiny": (256, 256, 128, 512, 4),
}
BACKENDS = {"triton": None, "cublas": {"xla_gpu_enable_triton_gemm": False}}


def make_weights(shape, fused: bool, key, precision: str = "bf16"):
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
            w = (jax.random.normal(sub, s, jnp.float32) * s[0] ** -0.5).astype(BF16)
            if precision in ("bf16", "bf16k"):
                layer[name] = w
            else:
                weight, scale = quantize_weight(w)  # stored [out, in], as the engine stores them
                layer[name] = {"weight": weight, "scale": scale}
        out.append(layer)
    return out


def layers_fn(shape, fused: bool, precision: str = "bf16"):
    _, q_width, kv_width, inter, _ = shape

    def mm(x, w):
        if precision == "bf16":
            return x @ w
        if precision == "bf16k":  # our Pallas kernel
            return skinny_gemm(x, w, layout="kn")
        if precision == "w8k":
            return skinny_gemm(x, w["weight"], w["scale"], layout="nk")
        return fp8_matmul(x, w["weight"], w["scale"], activations=precision == "w8a8")

    def norm(x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(BF16)

    def run(x, weights):
        for w in weights:
            h = norm(x)
            if fused:
                qkv = mm(h, w["qkv"])
                q, k, v = qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:]
            else:
                q, k, v = mm(h, w["q"]), mm(h, w["k"]), mm(h, w["v"])
            # k and v feed the output weakly, so none of the three products is dead code
            attn = q + (1e-3 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))).astype(BF16)
            x = x + mm(attn, w["o"])
            h = norm(x)
            if fused:
                gu = mm(h, w["gate_up"])
                g, u = gu[:, :inter], gu[:, inter:]
            else:
                g, u = mm(h, w["gate"]), mm(h, w["up"])
            x = x + mm(jax.nn.silu(g) * u, w["down"])
        return x

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-7b")
    ap.add_argument("--rows", default="1,32,64,128,256,512")
    ap.add_argument("--backends", default="triton,cublas")
    ap.add_argument("--layouts", default="separate,fused")
    ap.add_argument("--precisions", default="bf16",
                    help="bf16, w8 (FP8 weights, XLA), w8a8 (FP8 weights and activations, XLA), bf16k and w8k "
                         "(bf16 and FP8 weights through our skinny GEMM); FP8 weights stored [out, in] "
                         "(jslora.model.quant; until c09d2f0 w8 and w8a8 "
                         "were [in, out] and w8t, w8a8t the [out, in] variants)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new variants after this")
    args = ap.parse_args()
    if args.quick:
        args.models, args.rows, args.backends, args.precisions = "tiny", "1,32", "triton", "bf16,bf16k,w8,w8a8,w8k"
    t_start = time.perf_counter()
    roof = rooflines() if jax.default_backend() == "gpu" else {"hbm_bytes_per_s": 1e11, "matmul_flops_per_s": 1e12}
    results = []
    for model in args.models.split(","):
        shape = SHAPES[model]
        for fused, precision in [(f, p) for f in (False, True) if ("fused" if f else "separate") in args.layouts
                                 for p in args.precisions.split(",")]:
            weights = make_weights(shape, fused, jax.random.PRNGKey(0), precision)
            nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights))
            params = sum(x.size for x in jax.tree_util.tree_leaves(weights))
            for rows in map(int, args.rows.split(",")):
                x = jax.random.normal(jax.random.PRNGKey(rows), (rows, shape[0]), jnp.float32).astype(BF16)
                for backend in args.backends.split(","):
                    if time.perf_counter() - t_start > args.budget_s:
                        print(f"budget spent: skipping {model} fused={fused} rows={rows} {backend}", flush=True)
                        continue
                    t0 = time.perf_counter()
                    try:
                        seconds = timed(layers_fn(shape, fused, precision), x, weights,
                                        compiler_options=BACKENDS[backend])
                    except Exception as e:  # noqa: BLE001 - a variant XLA cannot compile is reported, not fatal
                        results.append({"model": model, "layout": "fused" if fused else "separate", "rows": rows,
                                        "backend": backend, "precision": precision, "error": repr(e)[:500]})
                        print(f"{model} {precision} rows={rows} {backend}: {e!r:.300}", flush=True)
                        continue
                    # FP8 matmuls run at twice the bf16 rate on Hopper: their flops floor is half
                    flops = 2 * rows * params / (2 if precision == "w8a8" else 1)
                    floor = floor_seconds(roof, nbytes, flops)
                    row = {"model": model, "layout": "fused" if fused else "separate", "rows": rows,
                           "backend": backend, "precision": precision, "ms": seconds * 1e3, "floor_ms": floor * 1e3,
                           "x_floor": seconds / floor, "tb_s": nbytes / seconds / 1e12,
                           "tflop_s": 2 * rows * params / seconds / 1e12, "bench_s": time.perf_counter() - t0}
                    results.append(row)
                    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del weights
    write_json("gemm.json", {"environment": environment(), "roofline": roof, "results": results})
    print(f"\nroofline: copy {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {roof['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"{'model':>10} {'layout':>8} {'prec':>5} {'rows':>5} {'backend':>7} {'ms':>8} {'floor ms':>9} "
          f"{'x floor':>8} {'TB/s':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['model']:>10} {r['layout']:>8} {r['precision']:>5} {r['rows']:>5} {r['backend']:>7}   failed")
            continue
        print(f"{r['model']:>10} {r['layout']:>8} {r['precision']:>5} {r['rows']:>5} {r['backend']:>7} {r['ms']:>8.3f} "
              f"{r['floor_ms']:>9.3f} {r['x_floor']:>8.2f} {r['tb_s']:>6.2f}")


if __name__ == "__main__":
    main()
