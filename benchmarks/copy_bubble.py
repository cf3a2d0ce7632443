"""What an adapter's host -> device copy costs the steps running beside it: a pipelined loop of step-sized
programs (each takes fresh NumPy metadata, as the engine's step does, and the host waits for step k-1
after launching step k), with a second thread copying adapter-sized arrays to the device at a fixed rate.

    PYTHONPATH=. python benchmarks/copy_bubble.py --mb 16.8 --rate 24 --seconds 8     # writes $OUT/copy_bubble.json

Why: at S1 with 2000 adapters (~24 copies a second) the GPU idled 4.8% of a profiler window against
1.1% at n = 5. XLA's stream-executor client (as its source reads) queues host -> device transfers on
one stream that waits for the compute stream, with the next step's metadata behind them: a copy might
cost a step its full length. On the H200 (benchmarks/RESULTS.md, fourteenth session) a 16.8-MB copy cost
the steps 0.6 ms and landed in 4.2 ms beside 30-ms steps: no such wait. A copy from pinned host memory
goes on a device-to-device stream instead. Modes:
  none      no copies (the baseline)
  pageable  NumPy -> device (the engine's default host tier), issued by the copier thread at any time
  chunked   the same bytes as --chunks copies issued back to back (is the cost per copy or per byte?)
  put       as pageable, but each step's metadata goes to the device by an explicit device_put first
  slotted   the step loop issues the copy itself, after the step's metadata device_put and before the
            launch: every transfer waits for the compute stream's tail when it is issued (XLA's
            kComputeSynchronized model), so a copy issued there waits for the running step, as the next
            step's metadata does, but is queued behind that metadata rather than in front of it
  pinned    an array already in pinned host memory -> device (a pinned host tier after its fill)
  fill      NumPy -> pinned host -> device (a pinned tier that pins each adapter as it is read)
"""
from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json

MODES = ("none", "pageable", "chunked", "put", "slotted", "pinned", "fill")


def make_step(step_ms: float, n: int = 4096):
    """A jitted step of about step_ms (a loop of n x n bf16 products) that reads a small int32 metadata
    array from the host."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16) / 64

    @jax.jit
    def step(a, meta, iters):
        c = jax.lax.fori_loop(0, iters, lambda i, c: (c @ a).astype(a.dtype), a)
        return c[0, 0].astype(jnp.float32) + meta.sum().astype(jnp.float32)

    meta = np.arange(4096, dtype=np.int32)
    step(a, meta, 1).block_until_ready()
    t0 = time.perf_counter()
    step(a, meta, 16).block_until_ready()
    iters = max(1, int(step_ms / 1e3 / ((time.perf_counter() - t0) / 16)))
    step(a, meta, iters).block_until_ready()
    return lambda meta: step(a, meta, iters)


def run(step, seconds: float, copy, rate: float, slotted: bool = False, put: bool = False) -> dict:
    """Steps launched back to back for `seconds` (host waits for step k-1 after launching step k) while
    `copy` runs `rate` times a second: on another thread, or (slotted) from the step loop between the
    step's metadata device_put and its launch. put: the metadata goes by an explicit device_put. Returns
    ms per step, copies made and how long they took to land (slotted: at the granularity of a step)."""
    stop, copies, copy_ms = threading.Event(), [0], []

    def copier():
        held = []
        next_t = time.perf_counter()
        while not stop.is_set():
            next_t += 1.0 / rate
            t0 = time.perf_counter()
            held.append(copy())
            jax.block_until_ready(held[-1])
            copy_ms.append((time.perf_counter() - t0) * 1e3)
            copies[0] += 1
            held = held[-4:]  # a few staged copies live at once, as in the engine
            time.sleep(max(0.0, next_t - time.perf_counter()))

    rng = np.random.default_rng(0)
    thread = threading.Thread(target=copier, daemon=True) if copy is not None and not slotted else None
    prev = step(rng.integers(0, 9, 4096, dtype=np.int32))
    np.asarray(prev)
    if thread:
        thread.start()
        time.sleep(0.3)
    steps, t0 = 0, time.perf_counter()
    c0, next_copy, in_flight = copies[0], t0, []
    while time.perf_counter() - t0 < seconds:
        meta = rng.integers(0, 9, 4096, dtype=np.int32)  # fresh metadata: a host -> device transfer
        if put or slotted:
            meta = jax.device_put(meta)
        now = time.perf_counter()
        if slotted and now >= next_copy:
            in_flight.append((now, copy()))
            next_copy += 1.0 / rate
        out = step(meta)
        np.asarray(prev)
        prev, steps = out, steps + 1
        for issued, array in list(in_flight):
            if array.is_ready():
                copy_ms.append((time.perf_counter() - issued) * 1e3)
                copies[0] += 1
                in_flight.remove((issued, array))
    np.asarray(prev)
    elapsed = time.perf_counter() - t0
    made = copies[0] - c0
    stop.set()
    if thread:
        thread.join()
    return {"ms_per_step": elapsed / steps * 1e3, "steps": steps, "copies": made, "seconds": elapsed,
            "copy_ms_p50": float(np.median(copy_ms)) if copy_ms else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16.8, help="bytes of one copy (Llama-7B rank 8 on q,k,v,o: 16.8)")
    ap.add_argument("--rate", type=float, default=24.0, help="copies a second (S1 n = 2000 made ~24)")
    ap.add_argument("--step-ms", type=float, default=28.0, help="length of one step (S1 saturation: ~28)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--chunks", type=int, default=8, help="copies the chunked mode splits one copy into")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--matrix", type=int, default=4096, help="side of the step's products (small on a CPU)")
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    kinds = {m.kind for m in device.addressable_memories()}
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host") if "pinned_host" in kinds else None
    data = np.random.default_rng(1).standard_normal(int(args.mb * 1e6 / 2)).astype(jnp.bfloat16)
    step = make_step(args.step_ms, args.matrix)
    chunks = np.array_split(data, args.chunks)
    pageable = lambda: jax.device_put(data, on_device)  # noqa: E731
    copies = {"none": None, "pageable": pageable, "put": pageable, "slotted": pageable,
              "chunked": lambda: [jax.device_put(c, on_device) for c in chunks]}
    if pinned is not None:
        resident = [jax.device_put(data, pinned).block_until_ready() for _ in range(4)]
        ring = iter(range(1 << 30))
        copies["pinned"] = lambda: jax.device_put(resident[next(ring) % 4], on_device)
        copies["fill"] = lambda: jax.device_put(jax.device_put(data, pinned), on_device)
    rows = []
    base = None
    for mode in args.modes.split(","):
        if mode not in copies:
            print(f"{mode}: not available here (memory kinds {sorted(kinds)})")
            continue
        r = {"mode": mode, **run(step, args.seconds, copies[mode], args.rate, slotted=mode == "slotted",
                                 put=mode == "put")}
        if mode == "none":
            base = r["ms_per_step"]
        if base is not None and r["copies"]:
            r["ms_lost_per_copy"] = (r["ms_per_step"] - base) * r["steps"] / r["copies"]
        rows.append(r)
        print(f"{mode:>9}: {r['ms_per_step']:.2f} ms a step, {r['copies']} copies "
              f"(p50 {r['copy_ms_p50'] or 0:.1f} ms each on the copier)"
              + (f", {r['ms_lost_per_copy']:.2f} ms of steps lost per copy" if "ms_lost_per_copy" in r else ""),
              flush=True)
    path = write_json("copy_bubble.json", {"env": environment(), "args": vars(args), "rows": rows})
    print(f"wrote {path}")
    print(f"\n{'mode':>9} {'ms/step':>8} {'copies':>7} {'copy ms':>8} {'lost ms/copy':>13}")
    for r in rows:
        print(f"{r['mode']:>9} {r['ms_per_step']:8.2f} {r['copies']:7d} {r['copy_ms_p50'] or 0:8.1f} "
              f"{r.get('ms_lost_per_copy', 0):13.2f}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
