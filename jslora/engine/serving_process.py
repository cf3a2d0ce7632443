"""Interpreter settings for a process whose job is serving (`jslora serve`, `jslora bench`), applied once
its start-up is done. Library users of `LLM` keep their own interpreter's settings."""
from __future__ import annotations

import gc
import sys

# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms). The adapter
# loaders' NumPy operations release the GIL and must win it back from the engine loop each time; at 5 ms
# a rank-8 Llama-7B read beside a busy loop took 438 ms against 49 ms alone, at 0.5 ms 100 ms
# (benchmarks/adapter_load.py, benchmarks/RESULTS.md, fourteenth session).
GIL_SWITCH_INTERVAL_S = 0.0005


def settle(switch_interval_s: float = GIL_SWITCH_INTERVAL_S) -> None:
    """What is alive now (weights, caches, compiled steps) lives as long as the process: out of the cyclic
    collector's full passes, which otherwise stall the step loop now and then; and a shorter GIL switch
    interval, so loader threads are not starved by the engine loop."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(switch_interval_s)
