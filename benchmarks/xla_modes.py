"""The engine's decode step under several XLA_FLAGS settings, each in a process of its own.

    PYTHONPATH=. python benchmarks/xla_modes.py                       # GPU: $OUT/xla_modes.json
    PYTHONPATH=. python benchmarks/xla_modes.py --quick               # CPU smoke run (tiny model)

Why: XLA runs a jitted step's kernels as CUDA graphs (command buffers). By default (scheduling mode
LHS) the graph's nodes follow the compiled schedule one after another; in CONCURRENT mode XLA gives the
graph only the edges the buffers' reads and writes need, so kernels with no data between them may run at
the same time on the GPU: a LoRA shrink reads only the layer's normed input, so it could share the
multiprocessors with the base GEMM that reads the same input (compute-bound at batch 256, while the
shrink is bound by reading adapter rows). The flags are read when XLA starts, so each setting runs
benchmarks/engine.py in a fresh process; the step's time is the wall time of back-to-back replays
(engine.py's `device_ms`: no profiler, which turns command buffers off).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import environment, write_json

VARIANTS = {
    "default": "",
    "concurrent": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
    "no_graphs": "--xla_gpu_enable_command_buffer=",
    # programmatic dependent launch (Hopper+): a kernel may start while the one before it drains, waiting
    # for its data inside (XLA's own kernels only; Pallas kernels are launched without it)
    "pdl_on": "--xla_gpu_enable_pdl=true",
    "pdl_off": "--xla_gpu_enable_pdl=false",
    # XLA's block-level (Triton) fusions: a reduction and what broadcasts its result in one kernel (the
    # RMSNorm's sum of squares and its scaling, two kernels twice a layer at batch 1 otherwise)
    "block_level": "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true",
}
# settings that need XLA's VMM allocator (XLA_PYTHON_CLIENT_ALLOCATOR=vmm, read when the client starts): XLA
# re-records, before each launch, every CUDA-graph node that reads a buffer which moved since the last launch
# (`command_buffer::update`, 1.9 ms a step at small batches and 3.5-4.4 ms in S1's long gaps: RESULTS.md,
# thirtieth session). Its update modes give the graphs' buffers fixed virtual addresses instead, remapping the
# memory behind them: all of them (NEVER_UPDATE, jaxlib 0.10), those of traced commands (CAPTURE_CMD_NEVER_UPDATE),
# or the temporaries only (SKIP_TEMP, the name in later XLA). A name XLA does not know fails that variant alone.
UPDATE_MODES = {"vmm": "", "never_update": "NEVER_UPDATE", "capture_never_update": "CAPTURE_CMD_NEVER_UPDATE",
                "skip_temp": "SKIP_TEMP"}
VARIANTS.update({name: f"--xla_gpu_command_buffer_update_mode={mode}" if mode else ""
                 for name, mode in UPDATE_MODES.items()})
# settings that are engine options, not XLA flags: extra arguments to benchmarks/engine.py
ENGINE_VARIANTS = {"fused_rope": ["--fused-rope"], "fused_norm": ["--fused-norm"],
                   "fused_both": ["--fused-rope", "--fused-norm"], "kv_fp8": ["--kv-cache-dtype", "fp8"],
                   "fused_kv_fp8": ["--fused-rope", "--fused-norm", "--kv-cache-dtype", "fp8"],
                   # the step with XLA's rematerialization pass, off by default (jslora.model.paged says why)
                   "remat": ["--xla-rematerialization"]}
CACHE_ROOT = "/tmp/xla_modes_cache"


def flags_of(name: str) -> str:
    """A variant's XLA flags; "default-2" is "default" run again (its own folder and, with --own-cache, cache);
    an engine variant ("fused_rope") runs with the default flags."""
    return VARIANTS.get(name.split("-")[0], "")


def failure(output: str) -> str:
    """What a failed process said: its first line naming an error (XLA prints its whole flag list after an
    unknown flag value), else its last 1,500 characters."""
    said = next((line for line in output.splitlines() if "rror" in line or "failed" in line), None)
    return said or output[-1500:]


def env_of(name: str) -> dict[str, str]:
    """A variant's environment beyond its XLA flags: the VMM allocator for the update modes."""
    return {"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"} if name.split("-")[0] in UPDATE_MODES else {}


def engine_args_of(name: str) -> list[str]:
    """A variant's extra engine.py arguments (ENGINE_VARIANTS; none for an XLA setting)."""
    base = name.split("-")[0]
    if base not in VARIANTS and base not in ENGINE_VARIANTS:
        raise ValueError(f"unknown variant {name!r}: not in {sorted(VARIANTS) + sorted(ENGINE_VARIANTS)}")
    return ENGINE_VARIANTS.get(base, [])


def run_variant(name: str, flags: str, engine_args: list[str], timeout_s: float, tag: str,
                own_cache: bool = False) -> dict:
    out = os.path.join(os.environ.get("OUT", "."), f"{tag}_{name}")
    os.makedirs(out, exist_ok=True)
    if own_cache:  # its compiled steps and GEMM autotuning apart from the others' (a name run twice reuses it)
        engine_args = [*engine_args, "--compilation-cache-dir", os.path.join(CACHE_ROOT, f"{tag}_{name}")]
    env = {**os.environ, **env_of(name), "OUT": out,
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "benchmarks/engine.py", *engine_args], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        rc, tail = proc.returncode, failure(proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-1500:]
    result = {"variant": name, "xla_flags": flags, "env": env_of(name), "rc": rc, "seconds": time.perf_counter() - t0}
    path = os.path.join(out, "engine.json")
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            result["engine"] = json.load(f)
    else:
        result["tail"] = tail
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default,concurrent,no_graphs",
                    help=f"names from {sorted(VARIANTS) + sorted(ENGINE_VARIANTS)}, each optionally with -<n> "
                         "to run it again")
    ap.add_argument("--engine-args", default="--skip-warmup --model llama-7b --batches 256 --adapters 0,256 "
                                             "--rank 8 --steps 24")
    ap.add_argument("--timeout-s", type=float, default=200)
    ap.add_argument("--tag", default="xla_modes", help="names the JSON file and the per-setting folders")
    ap.add_argument("--own-cache", action="store_true",
                    help="each variant name compiles (and autotunes its GEMMs) into a cache of its own: "
                         "'default-1,default-2,default-1' shows whether two processes' steps differ and whether "
                         "the first's cache brings its time back")
    ap.add_argument("--quick", action="store_true", help="engine.py --quick in each setting (CPU smoke run)")
    args = ap.parse_args()
    engine_args = ["--quick"] if args.quick else args.engine_args.split()
    for v in args.variants.split(","):  # a misspelt name fails before any runs
        engine_args_of(v)
    results = []
    for v in args.variants.split(","):  # written after each, so a call cut short keeps what ran
        results.append(run_variant(v, flags_of(v), engine_args + engine_args_of(v), args.timeout_s, args.tag,
                                   args.own_cache))
        write_json(f"{args.tag}.json", {"env": environment(), "engine_args": engine_args, "results": results})
        print(v, {k: x for k, x in results[-1].items() if k != "engine"}, flush=True)
    print(f"\n{'variant':>20} {'adapters':>8} {'batch':>5} {'wall ms':>8} {'host ms':>7} {'dev ms':>7} {'x floor':>7} "
          f"{'vs first':>10}  profiled ms by kind")
    first = next((x for x in results if "engine" in x), {"engine": {"rows": []}})  # the ratios' reference
    default = {(r["distinct_adapters"], r["batch"]): r["device_ms"] for r in first["engine"]["rows"]}
    for x in results:
        if "engine" not in x:
            print(f"{x['variant']:>20} failed (rc {x['rc']}): {x.get('tail', '')[-300:]}")
            continue
        for r in x["engine"]["rows"]:
            base = default.get((r["distinct_adapters"], r["batch"]))
            print(f"{x['variant']:>20} {r['distinct_adapters']:>8} {r['batch']:>5} {r['wall_ms']:8.2f} "
                  f"{r['host_ms']:7.2f} {r['device_ms']:7.3f} {r['device_over_floor']:7.2f} "
                  f"{r['device_ms'] / base if base else float('nan'):10.3f}  "
                  + " ".join(f"{k} {ms:.3f}" for k, ms in (r.get("device_ms_by_kind") or {}).items()))


if __name__ == "__main__":
    main()
