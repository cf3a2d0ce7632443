"""Host time to read one PEFT adapter from disk into the host tier (read, scale, check, pack into pool
rows), alone and beside a thread that keeps the GIL busy, as the engine loop does at saturation. CPU only.

    PYTHONPATH=. python benchmarks/adapter_load.py --model llama-7b --rank 8     # writes $OUT/adapter_load.json

A loader thread pays, besides its own work, a wait for the GIL after every operation that released it
(up to sys.getswitchinterval(), 5 ms, while another thread runs Python). At S1 with 10,000 adapters read
from disk the loaders delivered ~20 adapters a second beside the engine loop: this measures that cost.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time

import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from jslora.bench.adapter_files import write_peft_adapters
from jslora.config import ModelConfig
from jslora.engine.adapter_store import AdapterStore, load_adapter_spec
from jslora.parallel.lora_partition import LoraPartition
from pallas_kernels.pool import PoolLayout


def load_seconds(store, cfg, path, rank, repeats: int, busy: bool) -> float:
    stop = threading.Event()

    def spin():  # pure Python: holds the GIL but at the interpreter's switch points
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    samples = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            store._pack(load_adapter_spec(path, cfg, rank, "a", store.dtype))
            samples.append(time.perf_counter() - t0)
    finally:
        stop.set()
    return float(np.median(samples))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the run (CPython's default 0.005; `jslora bench "
                         "--gil-switch-interval`)")
    args = ap.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    cfg = ModelConfig.named(args.model)
    max_rank = max(16, args.rank)
    partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 1024, cfg.kv_width), 1, max_rank)
    store = AdapterStore(cfg, partition, max_rank, jnp.bfloat16, 1 << 30)
    with tempfile.TemporaryDirectory() as root:
        path = write_peft_adapters(root, {"a": args.rank}, cfg, progress=False)["a"]
        load_seconds(store, cfg, path, max_rank, 1, False)  # warm: page cache, imports
        alone = load_seconds(store, cfg, path, max_rank, args.repeats, False)
        busy = load_seconds(store, cfg, path, max_rank, args.repeats, True)
    row = {"model": args.model, "rank": args.rank, "switch_interval_s": sys.getswitchinterval(),
           "alone_ms": alone * 1e3, "beside_busy_thread_ms": busy * 1e3}
    print(f"{args.model} rank {args.rank}, GIL switch interval {sys.getswitchinterval() * 1e3:g} ms: "
          f"read + pack {row['alone_ms']:.1f} ms alone, "
          f"{row['beside_busy_thread_ms']:.1f} ms beside a thread running Python")
    write_json("adapter_load.json", {"env": environment(), **row})
    return row


if __name__ == "__main__":
    main()
