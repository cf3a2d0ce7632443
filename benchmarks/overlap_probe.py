"""Can the LoRA kernels hide under the base GEMMs? (issue 22: S1's ratio to base-only)

    PYTHONPATH=. python benchmarks/overlap_probe.py            # GPU: $OUT/overlap_probe.json
    PYTHONPATH=. python benchmarks/overlap_probe.py --quick    # CPU smoke run (interpret mode, tiny)

At S1 (240 decode rows, ~226 distinct rank-8 adapters) jslora's step is 2.8 ms longer than base-only's, and
the LoRA rows alone are worth ~0.9 ms at the copy rate, so 0.95x base-only needs the LoRA kernels at about the
copy rate or running while the compute-bound GEMMs leave HBM idle (RESULTS.md, thirty-second session). This
probe times the second way before the model is changed for it: a chain of `--layers` q,k,v projections of
Llama-7B (distinct weights each, 100 MB a layer, so they come from HBM) over S1's rows, each layer's input
the last one's q output RMS-normalised, with the q,k,v group's LoRA (the engine's kernels and tiling) in four forms:

- gemm: the GEMMs alone; lora: the LoRA alone (its delta into zeros);
- in_place: as the engine does it: the expand adds into the GEMM's output, so it waits for the GEMM (the
  shrink reads only the input and may run beside it);
- beside: the LoRA's delta into zeros, added to the GEMM's output after an optimization barrier (so XLA does
  not fold the add into cuBLAS's epilogue, which would make the GEMM wait for the LoRA): neither waits for
  the other; beside_epilogue: the same without the barrier.

Every form with both is checked against the chain over plain-jnp LoRA (float32 gathers). Each under XLA's
default command-buffer order (serial) and its CONCURRENT mode, which runs independent
kernels of a graph at once. Wall time per chain, dispatch removed (many calls back to back, each call's
output the next one's input). Overlap won = gemm + lora - the form's time: what running beside the GEMM
gains. Prints a table; writes $OUT/overlap_probe.json.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, wall_seconds_per_call, write_json
from benchmarks.lora_tune import PROBLEMS, build, engine_tiling
from jslora.model.paged import _CONCURRENT_GRAPHS
from pallas_kernels.lora import lora_apply_group, lora_apply_group_reference

BF16 = jnp.bfloat16
FORMS = ("gemm", "lora", "in_place", "beside", "beside_epilogue")


def chain(form: str, num_pages: int, tiling: dict, widths: tuple[int, ...], reference: bool = False):
    """fn(h, weights, lora operands) -> h after len(weights) layers of `form`; reference: the LoRA by plain
    jnp gathers in float32 (the oracle every form is checked against)."""
    opts = dict(num_pages=num_pages, tokens_per_tile=16, **tiling)
    apply = lora_apply_group_reference if reference else lora_apply_group

    def lora(h, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows):
        return apply(h, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows, **opts)

    def split(y):
        return tuple(jnp.split(y, np.cumsum(widths)[:-1], axis=1))

    def fn(h, weights, pool, tile_rank, a_pages, b_pages, tile_rows):
        for i, w in enumerate(weights):
            layer = jnp.int32(i % 2)
            operands = (pool, layer, tile_rank, a_pages, b_pages, tile_rows)
            zeros = tuple(jnp.zeros((h.shape[0], n), h.dtype) for n in widths)
            if form == "gemm":
                ys = split(h @ w)
            elif form == "lora":
                ys = lora(h, zeros, *operands)
            elif form == "in_place":
                ys = lora(h, split(h @ w), *operands)
            else:
                deltas = lora(h, zeros, *operands)
                y = h @ w
                if form == "beside":
                    y = jax.lax.optimization_barrier(y)
                ys = tuple(a + d for a, d in zip(split(y), deltas))
            # the next layer's input is this one's q, RMS-normalised: the layers run in order, as a model's
            # do, and the output carries the last LoRA delta at full weight (the check sees it)
            q = ys[0][:, :h.shape[1]].astype(jnp.float32)
            h = (q * jax.lax.rsqrt(jnp.mean(q * q, axis=1, keepdims=True) + 1e-6)).astype(h.dtype)
        return h
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--problem", default="s1_qkv", choices=[n for n in PROBLEMS if n.endswith("qkv")])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode, serial only")
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    hidden = 4096
    rows, distinct, ranks, targets, max_rank = PROBLEMS[args.problem]
    if args.quick:
        hidden, rows, distinct, args.layers = 128, 40, 30, 2
    p, layouts, _ = build(rng, hidden, rows, distinct, ranks, targets, max_rank)
    a = layouts["gathered"]
    tiling = {k: v for k, v in engine_tiling(max_rank).items() if v is not None}
    if not on_gpu:
        tiling["interpret"] = True
    widths = tuple(y.shape[1] for y in a["ys"])
    weights = [jnp.asarray(rng.standard_normal((hidden, sum(widths)), dtype=np.float32) * hidden ** -0.5, BF16)
               for _ in range(args.layers)]
    operands = (weights, a["pool"], a["tile_rank"], a["a_pages"], a["b_pages"], a["tile_rows"])
    h = a["x"]
    modes = {"serial": {}, "concurrent": dict(_CONCURRENT_GRAPHS)} if on_gpu else {"serial": {}}
    results, outputs = {}, {}
    for mode, options in modes.items():
        for form in FORMS:
            fn = jax.jit(chain(form, p["num_pages"], tiling, widths), compiler_options=options or None)
            outputs[form, mode] = np.asarray(fn(h, *operands), np.float64)
            results[f"{form}/{mode}"] = {"ms": wall_seconds_per_call(fn, h, *operands) * 1e3}
            print(f"{form}/{mode}: {results[f'{form}/{mode}']['ms']:.3f} ms", flush=True)
    # the forms with both GEMM and LoRA compute the same thing as the in-place chain over plain-jnp LoRA
    ref = np.asarray(jax.jit(chain("in_place", p["num_pages"], tiling, widths, reference=True))(h, *operands),
                     np.float64)
    for (form, mode), out in outputs.items():
        if form not in ("gemm", "lora"):
            results[f"{form}/{mode}"]["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    for mode in modes:
        alone = results[f"gemm/{mode}"]["ms"] + results[f"lora/{mode}"]["ms"]
        for form in FORMS[2:]:
            results[f"{form}/{mode}"]["overlap_won_ms"] = alone - results[f"{form}/{mode}"]["ms"]
    path = write_json("overlap_probe.json", {"env": environment(), "args": vars(args), "rows": rows,
                                             "adapters": distinct, "tiling": tiling, "results": results})
    print(f"wrote {path}\n\n{args.layers} layers of q,k,v at {rows} rows, {distinct} adapters rank {ranks}; ms a chain")
    print(f"{'form':>16} " + " ".join(f"{m:>12} {'won':>7} {'err':>8}" for m in modes))
    for form in FORMS:
        cells = []
        for mode in modes:
            r = results[f"{form}/{mode}"]
            nan = float("nan")
            cells.append(f"{r['ms']:12.3f} {r.get('overlap_won_ms', nan):7.3f} {r.get('rel_err', nan):8.1e}")
        print(f"{form:>16} " + " ".join(cells))


if __name__ == "__main__":
    main()
