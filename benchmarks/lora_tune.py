"""Tile the decode LoRA kernels for the batches a saturated trace runs (issues 17 and 22).

    PYTHONPATH=. python benchmarks/lora_tune.py [--problems s1_qkv,s1_o,...] [--budget 200]
    PYTHONPATH=. python benchmarks/lora_tune.py --quick      # CPU smoke run (interpret mode, tiny)

The engine's decode LoRA (`pallas_kernels.lora.lora_apply_group` on gathered tiles of 16 rows) at the
shapes a step launches it with: Llama-7B's q,k,v group and o (H = 4096), ~240 decode rows, and as many
distinct adapters as S1 with 2000 adapters puts in a step (~226, so most tiles hold one row), or as
few as n = 5; and issue 17's one-target cases (256 rows, 64 or 256 adapters of ranks 8-64). Each
variant of the tiling (k_splits, split_rows, k_block, one_row_dot, stages, out_block, out_loop, loads_first)
is checked against the float64 oracle and timed with dispatch removed (`common.timed`); bytes = each distinct
adapter's A and B at its own rank, x once, y read and written; share = bytes / time / this run's best
copy rate. Pools hold two layers of ~100-500 MB, so the adapters are read from HBM, not L2. Prints the
best tiling per problem and the best one tiling over the decode problems; writes $OUT/lora_tune.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from benchmarks.common import environment, rooflines, timed, write_json
from jslora.bench.timeline import gpu_kernels, kernel_seconds_by_op, trace_events
from jslora.model.backend import LORA_TILING, lora_tiling
from pallas_kernels.lora import lora_apply_group, tiles_by_adapter
from pallas_kernels.problems import lora_group_problem
from pallas_kernels.triton_compat import pallas_call

BF16 = jnp.bfloat16
H = 4096
# name: (rows, distinct adapters, ranks cycled over them, targets, max_rank)
PROBLEMS = {
    "s1_qkv": (240, 226, [8], 3, 16),        # S1, n = 2000, at saturation: most rows have their own adapter
    "s1_o": (240, 226, [8], 1, 16),
    "n5_qkv": (240, 5, [8], 3, 16),          # S1, n = 5
    # a saturated S1 step's prompt rows (~400 tokens: about two requests, each its own adapter), which the
    # engine tiles as contiguous runs of 16 rows: ~26 tiles
    "prefill_qkv": (416, 2, [8], 3, 16),
    "prefill_o": (416, 2, [8], 1, 16),
    "mixed64": (256, 64, [8, 16, 32, 64], 1, 64),    # issue 17's item 5
    "mixed256": (256, 256, [8, 16, 32, 64], 1, 64),
    # the other rows of issue 17's table against vLLM's Triton shrink / expand (adapters padded to rank 64):
    # 1 and 8 adapters of ranks cycled from 8, at 256 and 32 rows; 64 and 256 adapters all of rank 8
    "issue_b256_a1": (256, 1, [8, 16, 32, 64], 1, 64),
    "issue_b256_a8": (256, 8, [8, 16, 32, 64], 1, 64),
    "issue_b32_a1": (32, 1, [8, 16, 32, 64], 1, 64),
    "issue_b32_a8": (32, 8, [8, 16, 32, 64], 1, 64),
    "issue_a64_r8": (256, 64, [8], 1, 64),
    "issue_a256_r8": (256, 256, [8], 1, 64),
}
# the kernels' own defaults, every keyword spelled out
KERNEL_DEFAULTS = dict(k_splits=1, split_rows=False, k_block=512, one_row_dot=False, one_row_fma=False,
                       one_row_k_block=None, stages=2, out_block=None, out_loop=1, loads_first=False,
                       expand_one_row_dot=False, expand_one_row_fma=False, mask_rank=False, early_pages=False,
                       kind_launches=False, one_row_out_loop=1, fused_one_row=False, fused_block=512, fused_depth=4,
                       fused_warps=4, shrink_warps=4, expand_warps=4)


def engine_tiling(max_rank: int) -> dict:
    """What the engine runs a problem with (backend.lora_tiling), every keyword spelled out."""
    return KERNEL_DEFAULTS | lora_tiling(max_rank)


DEFAULT = engine_tiling(16)  # the S1 problems' (max rank one block); the sweep's variants are over it
ONE_ROW_DOT = dict(DEFAULT, one_row_dot=True, stages=3, expand_one_row_dot=True)
PER_TOKEN = [dict(DEFAULT, k_splits=1, per_token=True), dict(DEFAULT, k_splits=4, split_rows=True, per_token=True),
             dict(ONE_ROW_DOT, k_splits=1, per_token=True)]
KEY = (*DEFAULT, "per_token")


def build(rng, hidden, rows, distinct, ranks, targets, max_rank):
    adapter_of_row = rng.permutation(np.arange(rows) % distinct)
    p = lora_group_problem(rng, num_layers=2, page_width=hidden, in_features=hidden, out_features=[hidden] * targets,
                           adapter_ranks=[[ranks[a % len(ranks)]] * targets for a in range(distinct)],
                           tile_adapters=[int(a) for a in adapter_of_row], max_rank=max_rank)
    # regroup the one-row tiles into the decode layout: tiles of 16 rows sharing an adapter
    tile_rows, tile_adapter = tiles_by_adapter(adapter_of_row, rows, 16)
    first = tile_rows[:, 0]
    live = tile_adapter >= 0
    tile_rank = np.where(live[:, None], p["tile_rank"][first], 0).astype(np.int32)
    moved = (sum(ranks[a % len(ranks)] * 2 * hidden * 2 * targets for a in range(distinct))
             + rows * hidden * 2 * (1 + 2 * targets))
    args = dict(x=jnp.asarray(p["x"], BF16), ys=tuple(jnp.asarray(y, BF16) for y in p["ys"]),
                pool=jnp.asarray(p["pool"], BF16), layer=jnp.asarray(p["layer"]), tile_rank=jnp.asarray(tile_rank),
                a_pages=tuple(jnp.asarray(t[first]) for t in p["a_pages"]),
                b_pages=tuple(jnp.asarray(t[first]) for t in p["b_pages"]), tile_rows=jnp.asarray(tile_rows))
    # the same rows one tile each (EngineConfig.decode_lora_tile = 1: no gathering, no row table)
    per_token = dict(args, tile_rank=jnp.asarray(p["tile_rank"]), a_pages=tuple(map(jnp.asarray, p["a_pages"])),
                     b_pages=tuple(map(jnp.asarray, p["b_pages"])), tile_rows=None)
    return p, {"gathered": args, "per_token": per_token}, moved


L2_FLUSH_BYTES = 256 << 20  # over 5x the H200's 50 MB L2
FLUSH_ROWS = 4


def _flush_kernel(scratch_ref, out_ref):
    rows = pl.ds(pl.program_id(0) * FLUSH_ROWS, FLUSH_ROWS)
    out_ref[rows] = jnp.sum(scratch_ref[rows, :], axis=1)


@jax.jit
def l2_flush(scratch):
    """Row sums of scratch, as a kernel named l2_flush (so a trace can leave it out): it reads, so L2 is
    left full of clean lines (a flush that writes leaves dirty ones, whose write-back the next kernel's
    reads then wait on: the sixth H200 call of the nineteenth session)."""
    return pallas_call(_flush_kernel, out_shape=jax.ShapeDtypeStruct(scratch.shape[:1], scratch.dtype),
                       grid=(scratch.shape[0] // FLUSH_ROWS,), interpret=False, name="l2_flush")(scratch)


def kernel_split(run, carry, operands, calls: int = 8, flush_l2: bool = False, donate_carry: bool = False) -> dict:
    """Device µs per call by kernel (shrink, expand, the page tables' concatenation), from a profiler
    trace of `calls` calls. flush_l2: each call follows a read of L2_FLUSH_BYTES (the kernel l2_flush,
    left out of the result), so the call reads its operands from HBM, as inside a step,
    where a whole layer passes between two calls of a layer's kernel. donate_carry: the carry's buffers are
    the call's to update in place (as inside a step), not copied first."""
    fn = jax.jit(run, donate_argnums=(0,) if donate_carry else ())
    carry = jax.block_until_ready(fn(carry, *operands))  # a donated carry is gone: go on from the output
    scratch = jnp.zeros((L2_FLUSH_BYTES // 4096, 1024), jnp.float32) if flush_l2 else None
    folder = tempfile.mkdtemp()
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    for _ in range(calls):
        if flush_l2:
            l2_flush(scratch)
        carry = fn(carry, *operands)
    jax.block_until_ready(carry)
    jax.profiler.stop_trace()
    events, devices = trace_events(folder)
    totals = kernel_seconds_by_op(gpu_kernels(events, devices))
    shutil.rmtree(folder, ignore_errors=True)
    return {name: s * 1e6 / calls for name, s in totals.most_common(8) if name != "l2_flush"}


def device_us(fn, *args, flush_l2: bool = False) -> dict:
    """Device µs per call of fn(*args) by kernel name, from a profiler trace (lora_tune's kernel_split);
    flush_l2: each call reads its operands from HBM (see kernel_split)."""
    # the carry is fn's output (same structure each call, so one compile), not an input
    return kernel_split(lambda _, *operands: fn(*operands), fn(*args), args, flush_l2=flush_l2)


def measure(p, layouts, moved, roof, tiling, split: bool = False, flush_l2: bool = False) -> dict:
    tiling = {"per_token": False, **tiling}
    a = layouts["per_token" if tiling["per_token"] else "gathered"]
    opts = dict(num_pages=p["num_pages"], tokens_per_tile=1 if tiling["per_token"] else 16,
                **{k: v for k, v in tiling.items() if v is not None and k != "per_token"})

    def run(ys, x, pool, layer, tile_rank, a_pages, b_pages, tile_rows):
        return lora_apply_group(x, ys, pool, layer, tile_rank, a_pages, b_pages, tile_rows, **opts)

    operands = (a["x"], a["pool"], a["layer"], a["tile_rank"], a["a_pages"], a["b_pages"], a["tile_rows"])
    out = run(a["ys"], *operands)
    err = max(float(np.linalg.norm(np.asarray(o, np.float64) - np.asarray(y, np.float64) - d) / np.linalg.norm(d))
              for o, y, d in zip(out, a["ys"], p["deltas"]))
    # the carry is ys (fed back), so each call's expand reads the last call's output
    t = timed(run, a["ys"], *operands)
    row = {**tiling, "us": t * 1e6, "rel_err": err, "share": moved / t / roof["hbm_bytes_per_s"]}
    if split:
        row["kernels_us"] = kernel_split(run, a["ys"], operands, flush_l2=flush_l2)
        kernels = sum(us for name, us in row["kernels_us"].items() if name.startswith("lora_"))
        # everything the call runs in a step: the kernels and the page tables' concatenation;
        # not the harness's copy of ys (a step's ys are the GEMMs' outputs, updated in place)
        in_step = sum(us for name, us in row["kernels_us"].items() if "memcpy" not in name.lower())
        if kernels:  # the CPU's trace has no kernels
            row["kernels_share"] = moved / (kernels * 1e-6) / roof["hbm_bytes_per_s"]
            row["in_step_share"] = moved / (in_step * 1e-6) / roof["hbm_bytes_per_s"]
    print("  " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default=",".join(n for n in PROBLEMS if not n.startswith(("prefill", "issue"))))
    ap.add_argument("--budget", type=float, default=200, help="seconds; later variants are skipped past it")
    ap.add_argument("--quick", action="store_true", help="tiny problems, few tilings (a CPU smoke run)")
    ap.add_argument("--tilings", default=None, metavar="JSON",
                    help="time only these tilings (a JSON list of options over the default), the default first, "
                         "each problem in turn: a short run that compares a few candidates on every problem")
    ap.add_argument("--flush-l2", action="store_true",
                    help="the kernels' device times with L2 flushed before each call (operands read from HBM, as "
                         "in a step, where a whole layer passes between two calls)")
    args = ap.parse_args()
    start = time.perf_counter()
    problems, hidden = PROBLEMS, H
    # on the best of stage 1: longer shrink steps; wider expand blocks; expand programs that walk several
    # column blocks (fewer programs: benchmarks/kernel_ir.py counts 23,040 for S1's q, k, v), with every
    # block's reads issued first (loads_first: max_rank 16 is one rank block)
    splits = (1, 4)  # 8 measured no better than 4 (lora_tune at 21487d9): room for the one-row variants
    blocks = [dict(k_block=1024), dict(k_block=256), dict(out_block=256), dict(out_block=128, out_loop=4),
              dict(out_block=128, out_loop=16), dict(out_block=256, out_loop=8),
              dict(out_block=128, out_loop=8, loads_first=True), dict(out_block=256, out_loop=4, loads_first=True)]
    if args.quick:
        problems, hidden = {"s1_qkv": (40, 30, [8], 3, 16), "s1_o": (40, 30, [8], 1, 16),
                            "n5_qkv": (40, 5, [8], 3, 16)}, 128
        splits, blocks = (1, 2), [dict(out_block=32, out_loop=2, loads_first=True)]
        if args.problems == ap.get_default("problems"):
            args.problems = ",".join(problems)
    roof = rooflines() if jax.default_backend() == "gpu" else {"hbm_bytes_per_s": 1e11}
    if args.flush_l2 and jax.default_backend() != "gpu":
        print("--flush-l2: a GPU's L2 only; ignored here")
        args.flush_l2 = False
    rng = np.random.default_rng(0)
    # each split with one-row tiles multiplied by multiply-and-sum (as measured so far) and on tensor-core
    # dots, software-pipelined three deep (one_row_dot, stages: what the Triton IR compiled for sm_90a
    # showed the first path lacks)
    stage1 = [dict(DEFAULT, k_splits=k, split_rows=s, one_row_dot=d, expand_one_row_dot=d, stages=3 if d else 2)
              for k, s, d in itertools.product(splits, (False, True), (False, True)) if not (k == 1 and s)]
    if DEFAULT not in stage1:
        stage1.append(dict(DEFAULT))
    per_token = PER_TOKEN
    chosen = json.loads(args.tilings) if args.tilings else None
    if chosen is not None:
        blocks, per_token = [], []
    results = {}

    def save():
        return write_json("lora_tune.json", {"env": environment(), "roofline": roof, "hidden": hidden,
                                             "problems": {k: list(v) for k, v in problems.items()},
                                             "results": results})

    for name in args.problems.split(","):
        if time.perf_counter() - start > args.budget:
            print(f"{name}: skipped, budget spent", flush=True)
            continue
        p, a, moved = build(rng, hidden, *problems[name])
        print(f"{name}: {moved / 1e6:.1f} MB", flush=True)
        default = engine_tiling(problems[name][-1])
        results[name] = {"bytes": moved, "default": default, "rows": []}
        rows = results[name]["rows"]
        if chosen is not None:  # each candidate over this problem's own engine tiling
            stage1 = [dict(default)] + [dict(default, **t) for t in chosen]
        for tiling in stage1 if default in stage1 else [default, *stage1]:
            if time.perf_counter() - start > args.budget:
                break
            split = tiling in (default, ONE_ROW_DOT) or chosen is not None
            rows.append(measure(p, a, moved, roof, tiling, split=split, flush_l2=args.flush_l2))
            save()
        best = min(rows, key=lambda r: r["us"])
        for block in blocks:
            if time.perf_counter() - start > args.budget:
                break
            rows.append(measure(p, a, moved, roof, {k: best[k] for k in DEFAULT} | block))
            save()
        for tiling in per_token:  # the decode path without gathering (EngineConfig.decode_lora_tile = 1)
            if time.perf_counter() - start > args.budget:
                break
            rows.append(measure(p, a, moved, roof, tiling, split=tiling is per_token[0]))
            save()
        best = min(rows, key=lambda r: r["us"])
        if "kernels_us" not in best:
            best.update({k: v for k, v in measure(p, a, moved, roof, {k: best[k] for k in KEY}, split=True,
                                                  flush_l2=args.flush_l2).items() if k.startswith("kernels")})
        save()
    print(f"wrote {save()}")
    key = KEY
    print(f"\ncopy rate {roof['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'problem':>10} {'MB':>6} {'default us':>10} {'share':>6} {'best us':>8} {'share':>6}  "
          "best tiling (k, split rows, k_block, one-row dot, stages, out_block, out_loop, loads first, "
          "expand one-row dot, per token)  err  default's kernels (device) share")
    for name, r in results.items():
        if not r["rows"]:
            continue
        default = next((x for x in r["rows"] if all(x[k] == v for k, v in r["default"].items()) and not x["per_token"]),
                       None)
        best = min(r["rows"], key=lambda x: x["us"])
        print(f"{name:>10} {r['bytes'] / 1e6:6.1f} {default['us'] if default else float('nan'):10.1f} "
              f"{default['share'] if default else float('nan'):6.0%} {best['us']:8.1f} {best['share']:6.0%}  "
              f"{tuple(best[k] for k in key)}  {max(x['rel_err'] for x in r['rows']):.1e}  "
              f"{default.get('kernels_share', float('nan')) if default else float('nan'):.0%}")
    # one tiling for the engine's decode step: the least total time over the S1 problems
    totals = {}
    for name in ("s1_qkv", "s1_o", "n5_qkv"):
        for x in results.get(name, {}).get("rows", []):
            totals.setdefault(tuple(x[k] for k in key), []).append(x["us"])
    present = len([n for n in ("s1_qkv", "s1_o", "n5_qkv") if n in results])
    full = {t: sum(v) for t, v in totals.items() if len(v) == present}
    if full:
        best = min(full, key=full.get)
        print(f"S1 problems together: default {full.get((*DEFAULT.values(), False), float('nan')):.1f} us, "
              f"best {full[best]:.1f} us at {best}")
        # the best gathered tiling as --decode-lora-tiling takes it (per-token rows are another engine
        # option, decode_lora_tile = 1, not a tiling)
        gathered = {t: us for t, us in full.items() if not t[-1]}
        tiling = dict(zip(DEFAULT, min(gathered, key=gathered.get)))
        tiling = {k: v for k, v in tiling.items() if v != DEFAULT[k] or k in LORA_TILING}
        write_json("lora_tune.json", {**json.load(open(save())), "best_s1_tiling": tiling,
                                      "best_s1_us": gathered[min(gathered, key=gathered.get)]})
        print("best S1 tiling: " + json.dumps(tiling))


if __name__ == "__main__":
    main()
