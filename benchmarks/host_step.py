"""The host's work per engine step at S1 saturation, on the CPU: what the engine does between two launches
(schedule, build the step's batch, pack it), timed per part over a replay of the S1 trace.

    PYTHONPATH=. python benchmarks/host_step.py                     # $OUT/host_step.json and a table
    PYTHONPATH=. python benchmarks/host_step.py --profile 25        # and cProfile's top 25 functions

Why: at S1 the engine has one GPU step (~23-28 ms on the H200) to schedule, build and launch the next, and
in 3-5% of steps it takes longer, each such step idling the GPU ~4 ms (benchmarks/RESULTS.md, thirtieth
session). The real Scheduler, AdapterResidency (with Llama-7B's page tables) and step_batch / pack_batch run
here under the scheduler simulator's clock (jslora.scheduler.simulator), so no device is needed and
the numbers are the host's alone. Absolute times depend on the machine's CPU; compare runs on one machine.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

from benchmarks.common import environment, write_json
from jslora.bench.trace import TraceConfig, generate_trace
from jslora.config import ModelConfig
from jslora.engine.batch import BatchShapes, step_batch
from jslora.engine.sizes import default_buckets
from jslora.model.packing import pack_batch
from jslora.parallel.lora_partition import LoraPartition
from jslora.scheduler import make_policy
from jslora.scheduler.rows import launched_rows
from jslora.scheduler.simulator import Simulator, StepCost
from pallas_kernels.pool import TILE, PoolLayout

PARTS = ("schedule", "step_batch", "pack_batch")


class HostStep(Simulator):
    """The simulator with Llama-7B's LoRA page tables and the engine's batch building after each schedule."""

    def __init__(self, model: str, targets: tuple[str, ...], max_batch: int, num_blocks: int, slot_tables: bool,
                 **kwargs):
        """slot_tables: the block tables gathered from the scheduler's rows by batch slot (as the engine
        does), else built from the requests' block lists."""
        cfg = ModelConfig.named(model)
        partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, num_blocks * TILE, cfg.kv_width), 1, 16)
        max_blocks = 2048 // TILE
        super().__init__(make_policy("fcfs"), num_blocks=num_blocks, max_batch=max_batch,
                         cost=StepCost(base_s=0.025), partition=partition, targets=targets,
                         max_blocks=max_blocks if slot_tables else None, **kwargs)
        self.buckets = default_buckets(max_batch, self.scheduler.max_num_batched_tokens)  # the engine's
        self.shapes = BatchShapes(TILE, max_blocks, max_batch, targets, eos_ids=(2,))
        self.seconds = {p: [] for p in PARTS}

    def schedule(self):
        t0 = time.perf_counter()
        plan = super().schedule()
        t1 = time.perf_counter()
        if plan:
            decode, chunks = plan.decode, plan.chunks
            rows = launched_rows(len(decode), [c.length for c in chunks], *self.buckets, TILE)
            batch = step_batch(decode, chunks, rows, self.shapes, self.residency,
                               with_prefill=bool(chunks), block_tables=self.scheduler.block_tables)
            t2 = time.perf_counter()
            pack_batch(batch)
            t3 = time.perf_counter()
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
                self.seconds[part].append(seconds)
        return plan


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--num-adapters", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=26305, help="pool blocks (S1's on the H200, FP8 KV)")
    ap.add_argument("--tables", choices=("slots", "lists"), default="slots",
                    help="block tables gathered by batch slot (the engine's) or built from each request's list")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions by own time")
    args = ap.parse_args(argv)
    trace = generate_trace(TraceConfig(num_adapters=args.num_adapters, rate=args.rate, duration=args.duration))
    sim = HostStep(args.model, ("q", "k", "v", "o"), args.max_batch, args.num_blocks, args.tables == "slots",
                   max_adapters=1024)
    profiler = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    result = sim.run(trace)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - t0
    rows = {}
    for part, seconds in sim.seconds.items():
        ms = np.asarray(seconds) * 1e3
        rows[part] = {"mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
                      "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}
    total = np.sum([np.asarray(s) for s in sim.seconds.values()], axis=0) * 1e3
    rows["total"] = {"mean_ms": float(total.mean()), "p50_ms": float(np.percentile(total, 50)),
                     "p99_ms": float(np.percentile(total, 99)), "max_ms": float(total.max())}
    out = {"env": environment(), "args": vars(args), "steps": len(total), "requests": len(result.requests),
           "adapter_loads": result.adapter_loads, "batch_avg": float(np.mean(result.step_rows)),
           "wall_s": wall, "parts": rows}
    path = write_json("host_step.json", out)
    if profiler:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.profile)
        print(stream.getvalue())
    print(f"wrote {path}")
    print(f"{len(total)} steps, {len(result.requests)} requests, {result.adapter_loads} adapter loads, "
          f"batch {out['batch_avg']:.0f}")
    print(f"\n{'part':>10} {'mean ms':>8} {'p50':>7} {'p99':>7} {'max':>7}")
    for part, r in rows.items():
        print(f"{part:>10} {r['mean_ms']:8.3f} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} {r['max_ms']:7.3f}")
    return out


if __name__ == "__main__":
    main()
