"""Prefix caching on one GPU: the shared-prefix workload (each adapter's own system prompt, then short
user turns, S-LoRA's arrival process) with and without the cache, and S1 at saturation (no shared
prefixes: the cache can only cost there) with and without it. Both sweeps run in one process, so the
second reuses the step variants the first compiled.

    PYTHONPATH=. python benchmarks/prefix_cache.py                 # GPU, Llama-7B: writes $OUT/prefix_cache.json
    PYTHONPATH=. python benchmarks/prefix_cache.py --model llama-3-8b --prefix 512,2048 --skip-saturation
    PYTHONPATH=. python benchmarks/prefix_cache.py --quick         # CPU smoke run, tiny model

Llama-7B's context is 2048 tokens, so its system prompts are 512-1535 tokens by default (a user turn and
the output must fit beside them); Llama-3-8B (8192) takes the 512-2048 of the issue.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from jslora.cli import main as jslora_main

SYSTEMS = "jslora,no-prefix-cache"


def run(out: Path, name: str, args: list[str]) -> list[dict]:
    folder = out / name
    jslora_main(["bench", "--systems", SYSTEMS, "--out", str(folder), "--no-progress", "--no-plots", *args])
    return json.loads((folder / "bench.json").read_text())["rows"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="4,10", help="shared-prefix workload rates (req/s)")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--saturation-duration", type=float, default=20.0)
    ap.add_argument("--skip-saturation", action="store_true")
    ap.add_argument("--model", default=None, help="a shipped config (llama-3-8b, ...): rank-8 adapters on it; "
                                                  "default: S-LoRA's S1 (Llama-7B)")
    ap.add_argument("--prefix", default="512,1536", help="system prompt lengths LOW,HIGH")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the engine loop of the shared-prefix runs (slows them; top functions in the JSON)")
    ap.add_argument("--profile-window", default=None, metavar="START,SECONDS",
                    help="a jax.profiler window of each shared-prefix run (GPU busy share, host events)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="fewer decode buckets: a shorter warm-up")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (EngineConfig.enforce_eager)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "bench_results"))
    if args.quick:
        model = ["--quick", "--model", "dummy:tiny"]
        shared = [*model, "--num-adapters", "3", "--shared-prefix", "48,80", "--rate", "6"]
        saturation = [*model, "--num-adapters", "6", "--rate", "20"]
    else:
        model = (["--model", f"dummy:{args.model}", "--ranks", "8", "--max-model-len", "4096"] if args.model
                 else ["--setting", "S1"]) + ["--preload"]
        shared = [*model, "--num-adapters", "10", "--shared-prefix", args.prefix, "--input-range", "16,128",
                  "--output-range", "16,128", "--rate", args.rates, "--duration", str(args.duration)]
        saturation = [*model, "--num-adapters", "2000", "--rate", "50", "--duration", str(args.saturation_duration),
                      "--host-adapter-gb", "48"]
    if args.host_profile:
        shared.append("--host-profile")
    if args.profile_window:
        shared += ["--profile-window", args.profile_window]
    if args.enforce_eager:
        shared.append("--enforce-eager")
    if args.max_num_seqs:
        shared += ["--max-num-seqs", str(args.max_num_seqs)]
    rows = [{"workload": "shared-prefix", **r} for r in run(out, "shared_prefix", shared)]
    if not args.skip_saturation:
        rows += [{"workload": "S1-saturation", **r} for r in run(out, "s1_saturation", saturation)]
    keep = ("workload", "system", "num_adapters", "rate", "throughput_req_s", "throughput_steady_req_s",
            "first_token_p50_s", "first_token_p99_s", "prefix_cache_hit_rate", "compile_s", "error")
    table = [{k: r.get(k) for k in keep if k in r} for r in rows]
    (out / "prefix_cache.json").write_text(json.dumps({"rows": rows}, indent=1, default=str))
    print(f"\n{'workload':>14} {'system':>16} {'n':>5} {'rate':>5} {'req/s':>6} {'steady':>6} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'hit rate':>8}")
    for r in table:
        if "error" in r:
            print(f"{r['workload']:>14} {r['system']:>16} error: {r['error']}")
            continue
        print(f"{r['workload']:>14} {r['system']:>16} {r['num_adapters']:>5} {r['rate']:>5g} "
              f"{r['throughput_req_s']:>6.2f} {r['throughput_steady_req_s'] or 0:>6.2f} "
              f"{r['first_token_p50_s'] * 1e3:>7.1f}ms {r['first_token_p99_s'] * 1e3:>7.1f}ms "
              f"{r.get('prefix_cache_hit_rate') or 0:>8.3f}")


if __name__ == "__main__":
    main()
