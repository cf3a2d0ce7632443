"""A replay's step timeline: what each engine step carried and where the wall time went.

The engine records one StepRecord per step (Engine.timeline); `summarize_timeline` turns them into the
numbers that say what holds a trace back: the running batch, the prefill padding, the host's own time
per step, the time blocked on the device, the replay's time outside the engine, and recompiles. The
device's side comes from a profiler window (`device_activity`): the share of the window the GPU was
busy, and how that time splits between the step programs.
"""
from __future__ import annotations

import bisect
import collections
import gc
import glob
import gzip
import json
import os
import re
import time

import numpy as np

UNWAITED_S = 2e-4  # a collect shorter than this found its tokens ready


def summarize_timeline(records: list, wall_s: float) -> dict:
    if not records:
        return {"steps": 0}
    starts = np.array([r.start for r in records])
    inside = np.array([r.end - r.start for r in records])
    durations = np.diff(np.append(starts, records[-1].end))  # to the next step's start: replay work included
    decode = np.array([r.decode_rows for r in records])
    prefill_tokens = np.array([r.prefill_tokens for r in records])
    padded = sum(r.rows for r in records)
    real = int(prefill_tokens.sum() + decode.sum())
    busy = decode > 0
    with_prefill = prefill_tokens > 0
    host_ms = np.array([r.host_s for r in records]) * 1e3
    worked = np.array([bool(r.rows) for r in records])
    # a step whose collect did not block: the device had finished the step before while the host was still
    # scheduling and launching this one, so it idled for part of this host time (where idle time comes from)
    unwaited = worked & (np.array([r.wait_s for r in records]) < UNWAITED_S)
    return {
        "steps": len(records),
        "steps_per_s": len(records) / wall_s,
        "running_batch_avg": float((decode * durations).sum() / durations.sum()),  # time-weighted
        "running_batch_avg_busy": float(decode[busy].mean()) if busy.any() else 0.0,
        "steps_with_prefill_share": float(with_prefill.mean()),
        "prefill_tokens_per_prefill_step": float(prefill_tokens[with_prefill].mean()) if with_prefill.any() else 0.0,
        "padding_share": 1 - real / padded if padded else 0.0,   # launched rows that were padding
        "host_ms_per_step": float(host_ms.mean()),
        "host_ms_p50": float(np.percentile(host_ms, 50)),
        "host_ms_p99": float(np.percentile(host_ms, 99)),
        "host_ms_max": float(host_ms.max()),
        "unwaited_share": float(unwaited.sum() / max(1, worked.sum())),
        "unwaited_host_ms_avg": float(host_ms[unwaited].mean()) if unwaited.any() else 0.0,
        # of that, inside the jitted step call: packing, argument handling and XLA's dispatch (a call
        # that waits for the device, e.g. on a value the host must read, shows up here)
        "dispatch_ms_per_step": float(np.mean([r.dispatch_s for r in records]) * 1e3),
        "host_share": float(sum(r.host_s for r in records) / wall_s),      # scheduling, batches, dispatch
        "wait_share": float(sum(r.wait_s for r in records) / wall_s),      # blocked on the device's tokens
        "engine_share": float(inside.sum() / wall_s),                      # inside Engine.step at all
        # the replay's own work between steps (median: idle waits for arrivals and profiler stalls aside)
        "outside_engine_ms_per_step": float(np.median(durations - inside) * 1e3),
        "compiles": int(sum(r.compiles for r in records)),
        # the LoRA rows a step reads grow with these (issue 22: S2's bytes), time-weighted as the batch
        "distinct_adapters_avg": float((np.array([r.adapters for r in records]) * durations).sum() / durations.sum()),
    }


class GcPauses:
    """Time the garbage collector stopped this process while open (a full pass over a large heap
    stalls whatever step is being built)."""

    def __init__(self):
        self.seconds, self.collections, self._started = 0.0, 0, None

    def _callback(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1
            self._started = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


def trace_events(trace_dir: str) -> tuple[list, set]:
    """The newest perfetto trace jax.profiler wrote under trace_dir: (its events, the pids of its GPU
    processes); ([], set()) when there is none. `gpu_kernels` picks the kernels out of them."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return [], set()
    events = json.load(gzip.open(max(files, key=os.path.getmtime)))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items()
               if re.search(r"gpu|device", name, re.I) and "host" not in name.lower()}
    return events, devices


def gpu_kernels(events: list, devices: set) -> list:
    """The trace's kernel runs on the GPU (complete events with a duration, on a device process)."""
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in devices and e.get("dur")]


def op_name(e: dict) -> str:
    """A kernel's name with XLA's numeric suffix dropped (gemm_fusion_dot.12 -> gemm_fusion_dot)."""
    return re.sub(r"[._]?\d+$", "", str(e.get("name")))


def kernel_seconds_by_op(kernels: list) -> collections.Counter:
    """Kernel time (s) by op (op_name), so one op's launches in every layer add up (gemm_fusion_dot.12 and
    gemm_fusion_dot.40 are one entry)."""
    totals = collections.Counter()
    for e in kernels:
        totals[op_name(e)] += e["dur"] / 1e6
    return totals


# what a kernel is, by its name: cuBLAS's (nvjet, gemv, split-K reduce) and XLA's Triton GEMMs; the LoRA and
# attention Pallas kernels (and the KV write beside attention); everything else (fusions, copies)
_KINDS = (("GEMM", re.compile(r"nvjet|gemm|gemv|cutlass|xmma|splitK|cublas", re.I)),
          ("LoRA", re.compile(r"lora", re.I)),
          ("attention", re.compile(r"attention|write_kv", re.I)))


def seconds_by_kind(seconds_by_op: dict) -> dict:
    """{op: s} -> {"GEMM" | "LoRA" | "attention" | "other": s}."""
    kinds = dict.fromkeys([k for k, _ in _KINDS] + ["other"], 0.0)
    for op, seconds in seconds_by_op.items():
        kinds[next((k for k, pattern in _KINDS if pattern.search(op)), "other")] += seconds
    return kinds


_LAUNCH = re.compile(r"LoadedExecutable::Execute\b")  # PjRt's execution of a compiled program


def _kernel_label(e: dict) -> str:
    """program:op of a kernel event."""
    return f"{e.get('args', {}).get('hlo_module', 'other')}:{op_name(e)}"


def gap_context(events: list, devices: set, gaps: list, before_us: float = 1500.0) -> list:
    """What ran around each (length, start, end) idle gap of the GPU: every event, device or host, that
    overlaps [start - before_us, end], as (where, thread, name, start and end relative to the gap's start,
    in us), so a gap can be traced to the copy, the launch or the wait in front of it."""
    out = []
    for length, start, end in gaps:
        around = [e for e in events if e.get("ph") == "X" and e.get("dur") and e["ts"] < end
                  and e["ts"] + e["dur"] > start - before_us]
        rows = sorted((("gpu" if e.get("pid") in devices else "host"), e.get("tid"), str(e.get("name"))[:60],
                       round(e["ts"] - start, 1), round(e["ts"] + e["dur"] - start, 1)) for e in around)
        # the host's 50 longest events (the Python frames around the launch among them) and the device's
        # last ones: enough to read the gap by, not the whole trace
        host = sorted(sorted((r for r in rows if r[0] == "host" and r[4] - r[3] >= 10),
                             key=lambda r: r[3] - r[4])[:50], key=lambda r: r[3])
        gpu = sorted((r for r in rows if r[0] == "gpu"), key=lambda r: r[4])[-12:]
        out.append({"us": round(length, 1), "gpu": gpu, "host": host})
    return out


def device_activity(trace_dir: str) -> dict:
    """From the perfetto trace jax.profiler wrote under trace_dir: the window's length, the time some
    kernel ran on the GPU (intervals merged across streams), the kernel time per XLA program and per op, and
    the idle time between kernels by the kernel that ended before it and the one that started after."""
    events, devices = trace_events(trace_dir)
    kernels = gpu_kernels(events, devices)
    if not kernels:
        return {}
    ordered = sorted(kernels, key=lambda e: e["ts"])
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in ordered]
    # when the host's program launches returned: a gap in which one did waited for the host (the launch
    # came late); a gap with none waited on the device's side (an input's transfer, a dependency)
    launches = sorted(e["ts"] + e.get("dur", 0) for e in events if e.get("ph") == "X"
                      and e.get("pid") not in devices and _LAUNCH.search(str(e.get("name", ""))))
    busy, (lo, hi), last = 0.0, spans[0], ordered[0]
    gaps = collections.defaultdict(lambda: [0, 0.0])  # (what ended, what started after the gap) -> [n, us]
    waited_for_launch, long_gaps = 0.0, []
    for e, (a, b) in zip(ordered[1:], spans[1:]):
        if a > hi:
            busy, lo = busy + hi - lo, a
            gap = gaps[(_kernel_label(last), _kernel_label(e))]
            gap[0], gap[1] = gap[0] + 1, gap[1] + a - hi
            long_gaps.append((a - hi, hi, a))
            i = bisect.bisect_right(launches, hi)
            if i < len(launches) and launches[i] < a:
                waited_for_launch += a - hi
        if b >= hi:
            hi, last = b, e
    busy += hi - lo
    # the window is the kernels' span: the host's own events run on into the profiler's stop (~1 s, no step
    # launched meanwhile), which would count as idle GPU time
    window = max(e["ts"] + e["dur"] for e in kernels) - spans[0][0]
    by_program = collections.Counter()
    for e in kernels:
        by_program[str(e.get("args", {}).get("hlo_module", "other"))] += e["dur"] / 1e6
    # the host's side: what its threads spent the window on (dispatch, thunks, waits), by event name
    host_time, host_calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("dur") and e.get("pid") not in devices:
            host_time[e["name"]] += e["dur"] / 1e6
            host_calls[e["name"]] += 1
    by_op = kernel_seconds_by_op(kernels)
    return {"window_s": window / 1e6, "gpu_busy_s": busy / 1e6, "gpu_busy_share": busy / window if window else 0.0,
            "kernel_s_by_program": dict(by_program.most_common(12)),
            "kernel_s_by_op": dict(by_op.most_common(40)),
            # every op counted (the list above is cut), and how many launches an op made: a step's many
            # small XLA ops show as launches, not time
            "kernel_s_by_kind": seconds_by_kind(by_op),
            "kernel_calls_by_op": dict(collections.Counter(op_name(e) for e in kernels).most_common(40)),
            # where the GPU idled: the idle time between the last kernel to end and the next to start, by
            # their programs and ops (a step waiting for its host -> device inputs, for the host, ...)
            "idle_s_between": [(before, after, n, us / 1e6) for (before, after), (n, us)
                               in sorted(gaps.items(), key=lambda kv: -kv[1][1])[:12]],
            "idle_s_launched_in_gap": waited_for_launch / 1e6,
            "longest_gaps": gap_context(events, devices, sorted(long_gaps, key=lambda g: (-g[0], g[1]))[:6]),
            "host_events": [(name, host_calls[name], seconds) for name, seconds in host_time.most_common(30)]}
