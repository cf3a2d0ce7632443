"""Host time to read one PEFT adapter from disk into the host tier (read, scale, check, pack into pool
rows), alone and beside a thread that keeps the GIL busy, as the engine loop does at saturation; and what
the reads cost that busy thread (the engine loop), read by loader threads or by worker processes
(EngineConfig.adapter_load_processes). CPU only.

    PYTHONPATH=. python benchmarks/adapter_load.py --model llama-7b --rank 8     # writes $OUT/adapter_load.json

A loader thread pays, besides its own work, a wait for the GIL after every operation that released it
(up to sys.getswitchinterval(), 5 ms, while another thread runs Python), and the busy thread loses the
time the loader holds the GIL. At S1 with 10,000 adapters read from disk the loaders delivered ~20
adapters a second beside the engine loop: this measures both costs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
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


def spin_rate(seconds: float, work=None) -> tuple[float, int]:
    """Iterations a second of a pure-Python loop (the engine loop's stand-in) over `seconds`, while
    work() runs on another thread (repeatedly, until the time is up); and how often work() ran."""
    stop, done = threading.Event(), [0]

    def repeat():
        while not stop.is_set():
            work()
            done[0] += 1

    worker = threading.Thread(target=repeat, daemon=True) if work else None
    if worker:
        worker.start()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            count += 1
    elapsed = time.perf_counter() - t0
    stop.set()
    if worker:
        worker.join()
    return count / elapsed, done[0]


def loop_loss(store, entry, seconds: float, threads: int) -> dict:
    """The busy loop's time lost per adapter read, `threads` loader threads reading via the store."""
    base, _ = spin_rate(seconds)
    lock = threading.Lock()

    def read_some():  # `threads` reads at once, as the store's loader threads do
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: store._read(entry), range(threads)))
        with lock:
            pass

    rate, rounds = spin_rate(seconds, read_some)
    reads = rounds * threads
    lost = (1 - rate / base) * seconds
    return {"reads": reads, "reads_per_s": reads / seconds, "loop_slowdown": 1 - rate / base,
            "loop_ms_lost_per_read": lost / max(reads, 1) * 1e3}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--processes", type=int, default=4, help="worker processes of the process reader")
    ap.add_argument("--threads", type=int, default=4, help="loader threads reading at once")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each busy-loop measurement")
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
        entry, _ = store.register("a", path, lazy=True)
        by_threads = loop_loss(store, entry, args.seconds, args.threads)
        processes = AdapterStore(cfg, partition, max_rank, jnp.bfloat16, 1 << 30, load_processes=args.processes)
        try:
            entry, _ = processes.register("a", path, lazy=True)
            processes._read(entry)  # the workers start and import
            by_processes = loop_loss(processes, entry, args.seconds, args.threads)
        finally:
            processes.close()
    row = {"model": args.model, "rank": args.rank, "switch_interval_s": sys.getswitchinterval(),
           "alone_ms": alone * 1e3, "beside_busy_thread_ms": busy * 1e3, "loader_threads": args.threads,
           "processes": args.processes, "read_in_threads": by_threads, "read_in_processes": by_processes}
    print(f"{args.model} rank {args.rank}, GIL switch interval {sys.getswitchinterval() * 1e3:g} ms: "
          f"read + pack {row['alone_ms']:.1f} ms alone, "
          f"{row['beside_busy_thread_ms']:.1f} ms beside a thread running Python")
    print(f"{args.threads} loader threads reading beside a busy Python loop, {args.seconds:g} s:")
    print("| read in | reads / s | loop slowed by | loop ms lost per read |")
    print("| --- | --- | --- | --- |")
    for label, r in (("the threads", by_threads), (f"{args.processes} processes", by_processes)):
        print(f"| {label} | {r['reads_per_s']:.1f} | {r['loop_slowdown']:.1%} | {r['loop_ms_lost_per_read']:.2f} |")
    write_json("adapter_load.json", {"env": environment(), **row})
    return row


if __name__ == "__main__":
    main()
