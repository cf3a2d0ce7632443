"""Can the LoRA expand ride in the projection's epilogue? (issue 22: S1's ratio; issue 17: the LoRA kernels)

    PYTHONPATH=. python benchmarks/gemm_expand_probe.py           # GPU: $OUT/gemm_expand_probe.json
    PYTHONPATH=. python benchmarks/gemm_expand_probe.py --quick   # CPU smoke run (interpret mode, tiny)

At S1 jslora's step is ~2.8 ms longer than base-only's: the LoRA kernels, about half of it the expand, which
reads y, B and v and writes y again after the GEMM. The projections at S1's 256-768 rows are compute-bound
with HBM at about a third of its rate, so B's rows read inside the GEMM's programs (pallas_kernels.gemm_expand)
could cost little. This probe times, over a chain of `--layers` q,k,v projections of Llama-7B (distinct weights
each, from HBM; each layer's input the last one's q, RMS-normalised), S1's rows (rank-8 adapters, most rows
their own):

- xla: the GEMMs alone, as the engine runs them (XLA's own GEMM);
- pallas/<cfg>: the GEMMs alone in gemm_expand's GEMM (no LoRA), per tiling: is it as fast as XLA's?
- engine: XLA's GEMM, then the engine's LoRA (shrink and expand, its tiling, in place);
- fused/<cfg>: the engine's shrink, then gemm_expand with the expand in its epilogue.

Every form with LoRA is checked against the chain over plain-jnp LoRA. Wall ms per chain, dispatch removed.
Prints a table last; writes $OUT/gemm_expand_probe.json.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, rooflines, wall_seconds_per_call, write_json
from benchmarks.lora_tune import build, engine_tiling
from pallas_kernels.gemm_expand import gemm_expand, v_by_row
from pallas_kernels.lora import lora_apply_group, lora_apply_group_reference
from pallas_kernels.lora_shrink import lora_shrink

BF16 = jnp.bfloat16
# (block_m, block_n, block_k, num_warps, num_stages)
CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4),
           (64, 256, 64, 8, 3)]
SHRINK_KEYS = ("k_splits", "split_rows", "k_block", "one_row_dot", "one_row_fma", "one_row_k_block", "stages",
               "mask_rank", "early_pages")


def chain(form: str, widths: tuple[int, ...], num_pages: int, tiling: dict, config=None, interpret=None):
    """fn(h, weights, lora operands) -> h after len(weights) layers of `form`."""
    opts = dict(num_pages=num_pages, tokens_per_tile=16)

    def shrink(h, pool, layer, tile_rank, a_pages, tile_rows):
        kw = {k: tiling[k] for k in SHRINK_KEYS}
        return lora_shrink(h, pool, layer, tile_rank, jnp.concatenate(a_pages, axis=2), tile_rows,
                           num_warps=tiling["shrink_warps"], interpret=interpret, **opts, **kw)

    def layer_out(h, w, i, pool, tile_rank, a_pages, b_pages, tile_rows, row_rank, row_b_pages):
        layer = jnp.int32(i % 2)
        if form == "xla":
            return h @ w
        blocks = {} if config is None else dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages"),
                                                    config))
        if form == "pallas":
            return gemm_expand(h, w, None, pool, layer, None, None, widths=widths, num_pages=num_pages,
                               interpret=interpret, **blocks)
        if form in ("engine", "reference"):
            ys = tuple(jnp.split(h @ w, np.cumsum(widths)[:-1], axis=1))
            apply = lora_apply_group_reference if form == "reference" else lora_apply_group
            extra = {} if form == "reference" else {k: v for k, v in tiling.items() if v is not None}
            ys = apply(h, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows, **opts,
                       **({"interpret": interpret} | extra))
            return jnp.concatenate(ys, axis=1)
        v = v_by_row(shrink(h, pool, layer, tile_rank, a_pages, tile_rows), tile_rows, tile_rank, h.shape[0])
        return gemm_expand(h, w, v, pool, layer, row_rank, row_b_pages, widths=widths, num_pages=num_pages,
                           interpret=interpret, **blocks)

    def fn(h, weights, *operands):
        for i, w in enumerate(weights):
            q = layer_out(h, w, i, *operands)[:, :h.shape[1]].astype(jnp.float32)
            h = (q * jax.lax.rsqrt(jnp.mean(q * q, axis=1, keepdims=True) + 1e-6)).astype(h.dtype)
        return h
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rows", default="256,512", help="rows a step launches (S1: 256 decode-only, 512-768 mixed)")
    ap.add_argument("--configs", type=json.loads, default=CONFIGS, metavar="JSON",
                    help="[[block_m, block_n, block_k, num_warps, num_stages], ...]")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode")
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    interpret = None if on_gpu else True
    hidden, targets, max_rank = 4096, 3, 16
    configs = [tuple(c) for c in args.configs]
    if args.quick:
        hidden, args.layers, args.rows, configs = 64, 2, "32", [(16, 32, 32, 4, 2)]
    roof = rooflines() if on_gpu else None
    results, lines = {}, []
    for rows in map(int, args.rows.split(",")):
        rng = np.random.default_rng(rows)
        # S1 at saturation: ~94% of the rows carry an adapter of their own (240 of 256), rank 8
        p, layouts, _ = build(rng, hidden, rows, rows * 15 // 16, [8], targets, max_rank)
        a = layouts["gathered"]
        tiling = engine_tiling(max_rank)
        widths = (hidden,) * targets
        weights = [jnp.asarray(rng.standard_normal((hidden, sum(widths)), dtype=np.float32) * hidden ** -0.5, BF16)
                   for _ in range(args.layers)]
        operands = (weights, a["pool"], a["tile_rank"], a["a_pages"], a["b_pages"], a["tile_rows"],
                    jnp.asarray(p["tile_rank"]), jnp.asarray(np.concatenate(p["b_pages"], axis=1)))
        h = a["x"]
        ref = np.asarray(jax.jit(chain("reference", widths, p["num_pages"], tiling, interpret=interpret))(h, *operands),
                         np.float64)
        forms = [("xla", None), ("engine", None)] + [(f, c) for c in configs for f in ("pallas", "fused")]
        flops = 2.0 * rows * hidden * sum(widths) * args.layers
        for form, config in forms:
            name = form if config is None else f"{form}/{'x'.join(map(str, config))}"
            try:
                fn = jax.jit(chain(form, widths, p["num_pages"], tiling, config, interpret))
                out = np.asarray(fn(h, *operands), np.float64)
                ms = wall_seconds_per_call(fn, h, *operands) * 1e3 if on_gpu else float("nan")
            except Exception as e:  # a tiling Triton rejects (shared memory, registers): say so, go on
                results[f"{rows}/{name}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"rows {rows} {name}: failed: {type(e).__name__}", flush=True)
                continue
            row = {"ms": ms, "ms_per_layer": ms / args.layers}
            if form in ("engine", "fused"):
                row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            if roof:
                row["matmul_share"] = flops / (ms * 1e-3) / roof["matmul_flops_per_s"]
            results[f"{rows}/{name}"] = row
            print(f"rows {rows} {name}: {ms:.3f} ms {row.get('rel_err', '')}", flush=True)
            lines.append((rows, name, row))
    path = write_json("gemm_expand_probe.json", {"env": environment(), "args": vars(args), "roofline": roof,
                                                 "results": results})
    print(f"wrote {path}")
    if roof:
        print(f"roofline: copy {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s, matmul "
              f"{roof['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"\n{args.layers} layers of q,k,v (K = N / 3 = {hidden}), rank-8 adapters on 15/16 of the rows; ms a chain")
    print(f"{'rows':>5} {'form':>24} {'ms':>8} {'us/layer':>9} {'of matmul':>9} {'rel err':>8}")
    for rows, name, r in lines:
        print(f"{rows:5d} {name:>24} {r['ms']:8.3f} {r['ms_per_layer'] * 1e3:9.1f} "
              f"{r.get('matmul_share', float('nan')):9.0%} {r.get('rel_err', float('nan')):8.1e}")


if __name__ == "__main__":
    main()
