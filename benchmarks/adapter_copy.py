"""Host -> device copy of one adapter's pool rows: from pageable NumPy (what the engine's stager does now,
`ModelRunner.adapter_rows`) and from pinned host memory (a candidate host tier), with the GPU idle and
while it runs step-sized work (a loop of bf16 matmuls of about 30 ms, as a saturated S1 step).

    PYTHONPATH=. python benchmarks/adapter_copy.py --model llama-7b --ranks 8,64      # writes $OUT/adapter_copy.json

At S1 with 2000 adapters a profiler window showed ~31 ms per adapter copy (16.8 MB: ~0.5 GB/s) on the
stager thread, about one step: this says whether that is the copy's rate or its wait behind the step,
and how long a copy keeps the engine loop's thread from running Python (the GIL).
"""
from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from jslora.config import ModelConfig
from jslora.engine.adapter_store import AdapterStore, load_adapter_spec
from jslora.parallel.lora_partition import LoraPartition
from pallas_kernels.pool import PoolLayout


def padded_rows(cfg, rank: int) -> np.ndarray:
    """One dummy adapter's page rows [L, pages, W] as the host tier keeps them (padded to its copy size)."""
    partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 1024, cfg.kv_width), 1, rank)
    store = AdapterStore(cfg, partition, rank, jnp.bfloat16, 1 << 30)
    return store._pack(load_adapter_spec(f"dummy:{rank}", cfg, rank, "a")).page_data


def copy_seconds(source, device, repeats: int, probe: bool = False) -> tuple[float, float]:
    """(median seconds of a copy made on a worker thread, as the engine's stager does; with probe, the
    longest gap the main thread saw between two iterations of a busy Python loop meanwhile: how long a
    copy keeps the GIL from the engine loop; the copy's time then includes its own waits for the GIL, as
    beside the engine loop)."""
    samples = []

    def copies():
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.device_put(source, device).block_until_ready()
            samples.append(time.perf_counter() - t0)

    worker = threading.Thread(target=copies)
    worker.start()
    last, longest = time.perf_counter(), 0.0
    while probe and worker.is_alive():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return float(np.median(samples)), longest


class Busy:
    """Keeps the device busy with back-to-back matmul loops (~step_ms each) until stopped."""

    def __init__(self, step_ms: float):
        n = 4096
        self.a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16) / 64
        self.loop = jax.jit(lambda a, k: jax.lax.fori_loop(0, k, lambda i, c: (c @ a).astype(a.dtype), a),
                            static_argnums=1)
        self.loop(self.a, 1).block_until_ready()
        t0 = time.perf_counter()
        self.loop(self.a, 8).block_until_ready()
        per = (time.perf_counter() - t0) / 8
        self.iters = max(1, int(step_ms / 1e3 / per))
        self.loop(self.a, self.iters).block_until_ready()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.loop(self.a, self.iters).block_until_ready()

    def __enter__(self):
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--step-ms", type=float, default=30.0, help="length of the busy loop's launches")
    ap.add_argument("--pinned-gb", type=float, default=0.0,
                    help="then fill a host tier of this many GB of pinned copies of the first rank's adapter "
                         "(as --preload does): the time it takes, and whether the pinned memory runs out")
    args = ap.parse_args(argv)
    cfg = ModelConfig.named(args.model)
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    # a sharding, not the device: a pinned buffer moves to device memory only when the target names its kind
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    pinned = (jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
              if "pinned_host" in kinds else None)
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        data = padded_rows(cfg, rank)
        sources = {"numpy": data}
        to_pinned_ms = None
        if pinned is not None:  # what the host tier pays to keep an adapter pinned (a loader thread's work)
            puts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                sources["pinned"] = jax.device_put(data, pinned).block_until_ready()
                puts.append(time.perf_counter() - t0)
            to_pinned_ms = float(np.median(puts)) * 1e3
        for name, source in sources.items():
            idle, _ = copy_seconds(source, device, args.repeats)
            with Busy(args.step_ms):
                busy, _ = copy_seconds(source, device, args.repeats)
                beside_python, stall = copy_seconds(source, device, args.repeats, probe=True)
            row = {"rank": rank, "source": name, "mb": data.nbytes / 1e6, "idle_ms": idle * 1e3, "busy_ms": busy * 1e3,
                   "idle_gb_s": data.nbytes / idle / 1e9, "busy_gb_s": data.nbytes / busy / 1e9,
                   "beside_python_ms": beside_python * 1e3, "main_thread_stall_ms": stall * 1e3,
                   "to_pinned_ms": to_pinned_ms if name == "pinned" else None}
            rows.append(row)
            print(f"rank {rank:3d} {name:>6}: {row['mb']:6.1f} MB, idle {row['idle_ms']:7.2f} ms "
                  f"({row['idle_gb_s']:5.1f} GB/s), beside {args.step_ms:.0f}-ms launches {row['busy_ms']:7.2f} ms "
                  f"({row['busy_gb_s']:5.1f} GB/s); beside a Python loop {row['beside_python_ms']:.2f} ms, "
                  f"the loop's longest stall {row['main_thread_stall_ms']:.2f} ms"
                  + (f", numpy -> pinned {to_pinned_ms:.2f} ms" if name == "pinned" else ""), flush=True)
    fill = None
    if args.pinned_gb and pinned is not None:
        data = padded_rows(cfg, int(args.ranks.split(",")[0]))
        count = int(args.pinned_gb * 1e9 // data.nbytes)
        held, t0, error = [], time.perf_counter(), None
        try:
            for _ in range(count):
                held.append(jax.device_put(data, pinned).block_until_ready())
        except Exception as e:  # noqa: BLE001 - the answer sought: where pinned memory runs out
            error = f"{type(e).__name__}: {e}"[:300]
        seconds = time.perf_counter() - t0
        fill = {"adapters": len(held), "gb": len(held) * data.nbytes / 1e9, "seconds": seconds,
                "gb_s": len(held) * data.nbytes / 1e9 / seconds, "error": error}
        print(f"pinned host tier: {fill['adapters']} adapters, {fill['gb']:.1f} GB in {seconds:.1f} s "
              f"({fill['gb_s']:.1f} GB/s){'; stopped: ' + error if error else ''}", flush=True)
        del held
    path = write_json("adapter_copy.json", {"env": environment(), "model": args.model, "memory_kinds": sorted(kinds),
                                            "step_ms": args.step_ms, "rows": rows, "pinned_fill": fill})
    print(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
