"""Start-up time of a server's engine on the GPU: building the model (dummy weights at a real shape),
registering adapters, and the warm-up that compiles every step variant; first with an empty XLA
compilation cache, then again in a new process with the cache the first one filled. With
--compile-threads 1,8 each thread count gets its own empty cache (EngineConfig.compile_threads: the
variants compiled that many at a time).

    PYTHONPATH=. python benchmarks/startup.py --model llama-7b      # GPU: writes $OUT/startup.json
    PYTHONPATH=. python benchmarks/startup.py --model llama-7b --compile-threads 1,8
    PYTHONPATH=. python benchmarks/startup.py --quick                # CPU smoke run on the tiny model
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(args) -> dict:
    t0 = time.perf_counter()
    from jslora import compilation_cache
    compilation_cache.enable(args.cache_dir)
    from jslora import LLM
    t_import = time.perf_counter()
    adapters = {f"a{i}": f"dummy:{r}" for i, r in enumerate((8, 16, 32, 64)[: args.adapters])}
    llm = LLM(f"dummy:{args.model}", adapters, max_lora_rank=64,
              engine={"max_batch": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "compile_threads": int(args.compile_threads), "xla_rematerialization": args.xla_rematerialization,
                      **({"num_pages": 4096} if args.quick else {})})
    t_built = time.perf_counter()
    warmup_s = llm.engine.warmup(progress=False)
    runner = llm.engine.runner
    return {"import_s": t_import - t0, "build_s": t_built - t_import, "warmup_s": warmup_s,
            "total_s": time.perf_counter() - t0, "variants": runner.compiles,
            "decode_buckets": list(llm.engine.sizes.decode_buckets),
            "step_buckets": list(llm.engine.sizes.step_buckets)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--compile-threads", default="1", help="comma-separated: one cold-cache run per count")
    ap.add_argument("--xla-rematerialization", action="store_true",
                    help="compile the steps with XLA's rematerialization pass (EngineConfig's, off by default)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.max_num_seqs, args.max_num_batched_tokens = "tiny", 8, 64
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    from benchmarks.common import environment, write_json

    runs = {}
    counts = args.compile_threads.split(",")
    # each thread count from an empty cache; then the last one's cache, warm, in a new process
    plan = [(f"cold, {n} thr" if len(counts) > 1 else "cold cache", n) for n in counts] + [("warm cache", counts[-1])]
    for label, threads in plan:
        if label != "warm cache":
            cache_dir = tempfile.mkdtemp(prefix="jslora-xla-cache-")
        cmd = [sys.executable, "-m", "benchmarks.startup", "--child", "--cache-dir", cache_dir,
               "--compile-threads", threads,
               "--model", args.model, "--adapters", str(args.adapters), "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens)] + (["--quick"] if args.quick else [])
        cmd += ["--xla-rematerialization"] if args.xla_rematerialization else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{label}: the child failed")
        runs[label] = {**json.loads(lines[-1][7:]), "process_s": time.perf_counter() - t0}
        print(label, runs[label], flush=True)
    env = environment()
    write_json("startup.json", {"environment": env, "args": vars(args), "runs": runs})
    print(f"\n{'run':>13} {'process s':>9} {'build s':>8} {'warm-up s':>9} {'variants':>8}")
    for label, r in runs.items():
        print(f"{label:>13} {r['process_s']:>9.1f} {r['build_s']:>8.1f} {r['warmup_s']:>9.1f} {r['variants']:>8}")


if __name__ == "__main__":
    main()
