"""S1 under the scheduler simulator, with and without cutting a step's last chunk to fit its bucket
(EngineConfig.fit_chunks_from): an estimate from a step-cost model, not a GPU measurement.

    PYTHONPATH=. python benchmarks/bucket_fit_sim.py                 # S1, 60 s, three seeds; JSON to $OUT
    PYTHONPATH=. python benchmarks/bucket_fit_sim.py --duration 10 --fit-from 0,128,192,256

The cost model is fitted to one H100's steps (benchmarks/RESULTS.md, thirty-eighth session: Llama-7B, FP8
cache, `benchmarks/engine.py --chunk 352`), each within 1% of the model:

    step ms = 1.0 + max(4.5, 0.021 x launched rows) + 0.107e-3 x context tokens of its decode rows
              + 4.5e-3 x prompt tokens

    200 decode rows (~485 keys), 256 launched       16.84 measured  16.8 model
    + a 352-token chunk, 640 launched               24.68           24.8
    the same, 768 launched (the old buckets)        27.34           27.5
    a 352-token chunk alone, 384 / 512 launched     10.69 / 13.38   10.6 / 13.3

The simulator gives every request its token when the step ends (no one-step lag), and has no LoRA and no
host time: it compares the two schedules' device time, which S1 is bound by. Its padding shares match the
GPU's runs (9% -> 4%); the gain it predicts (+2.2%) is about three times the measured one (+0.8%,
benchmarks/RESULTS.md, thirty-ninth session).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import numpy as np

from benchmarks.common import write_json
from jslora.bench.trace import TraceConfig, generate_trace
from jslora.engine.sizes import default_buckets
from jslora.scheduler import make_policy
from jslora.scheduler.rows import COMPUTE_BOUND_ROWS
from jslora.scheduler.simulator import Simulator, StepCost

H100_S1 = StepCost(base_s=1.0e-3, prefill_token_s=4.5e-6, decode_row_s=0.0, adapter_load_s=0.0,
                   weights_s=4.5e-3, launched_row_s=21e-6, context_token_s=0.107e-6)


def run(trace, fit_from: int | None, max_batch: int, budget: int, num_blocks: int, adapter_rows_s: float = 0.0,
        policy: str = "fcfs") -> dict:
    cost = dataclasses.replace(H100_S1, adapter_rows_s=adapter_rows_s)
    sim = Simulator(make_policy(policy), num_blocks=num_blocks, max_batch=max_batch, max_num_batched_tokens=budget,
                    cost=cost, adapter_pages=4, max_adapters=4096, buckets=default_buckets(max_batch, budget),
                    fit_from=fit_from, kv_pages=1)  # the FP8 cache: a token's K and V on one page
    result = sim.run(trace)
    done = [r for r in result.requests if r.finish_time is not None]
    first = [r.first_token_time - r.arrival for r in done]
    tokens = sum(len(r.generated) for r in done)
    return {"fit_from": fit_from, "requests": len(result.requests), "finished": len(done),
            "seconds": result.duration, "req_s": len(done) / result.duration, "tok_s": tokens / result.duration,
            "steps": len(result.launched), "padding_share": result.padding_share,
            "launched_rows_avg": float(np.mean(result.launched)), "batch_avg": float(np.mean(result.step_rows)),
            "ttft_p50_s": float(np.percentile(first, 50)), "ttft_p99_s": float(np.percentile(first, 99))}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--num-blocks", type=int, default=11874, help="S1's pool on the H100 (FP8 cache)")
    parser.add_argument("--fit-from", default=f"0,{COMPUTE_BOUND_ROWS}",
                        help="EngineConfig.fit_chunks_from values to compare, 0: off (the first is the baseline)")
    parser.add_argument("--adapter-rows-us", type=float, default=0.0,
                        help="µs a step per distinct adapter (the LoRA kernels): 0 models base-only; 12.8 jslora "
                             "(H100, S1: its step 2.8 ms over base-only's at ~219 adapters, thirty-fourth session)")
    parser.add_argument("--policy", default="fcfs", help="the scheduling policy (EngineConfig.policy)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    rows, fits = [], [int(n) for n in args.fit_from.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        trace = generate_trace(TraceConfig(num_adapters=2000, rate=args.rate, cv=1, duration=args.duration, seed=seed))
        for fit_from in fits:
            rows.append({"seed": seed, **run(trace, fit_from or None, args.max_batch, args.budget, args.num_blocks,
                                             args.adapter_rows_us * 1e-6, args.policy)})
    write_json(os.path.join(args.out, "bucket_fit_sim.json"), {"args": vars(args), "rows": rows})
    print(f"{'seed':>5} {'fit from':>8} {'req/s':>7} {'tok/s':>7} {'padding':>7} {'launched':>8} "
          f"{'batch':>6} {'TTFT p50/p99 s':>15}")
    for r in rows:
        print(f"{r['seed']:>5} {str(r['fit_from']):>8} {r['req_s']:7.2f} {r['tok_s']:7.0f} {r['padding_share']:7.3f} "
              f"{r['launched_rows_avg']:8.1f} {r['batch_avg']:6.1f} {r['ttft_p50_s']:7.2f}/{r['ttft_p99_s']:<7.2f}")
    for i, fit_from in enumerate(fits[1:], 1):
        gain = [rows[j + i]["req_s"] / rows[j]["req_s"] - 1 for j in range(0, len(rows), len(fits))]
        print(f"fit from {fit_from} vs {fits[0] or 'off'}: req/s {statistics.mean(gain):+.2%} "
              f"(per seed {', '.join(f'{g:+.2%}' for g in gain)})")
    return rows


if __name__ == "__main__":
    main()
