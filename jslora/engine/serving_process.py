"""Interpreter settings for a process whose job is serving (`jslora serve`, `jslora bench`), applied once
its start-up is done. Library users of `LLM` keep their own interpreter's settings."""
from __future__ import annotations

import gc
import sys


def settle(switch_interval_s: float | None = None) -> None:
    """What is alive now (weights, caches, compiled steps) lives as long as the process: out of the cyclic
    collector's full passes, which otherwise stall the step loop now and then. switch_interval_s: how long
    a thread may hold the GIL while another waits (sys.setswitchinterval; None keeps CPython's 5 ms).

    A shorter interval lets adapter loader threads win the GIL back from the engine loop sooner (a rank-8
    Llama-7B read beside a busy thread: 438 ms at 5 ms, 100 ms at 0.5 ms, benchmarks/adapter_load.py), but
    at S1 with 10,000 adapters on disk it served no more (25.81 against 25.89 req/s): the engine loop's
    own host time per step grew by as much (benchmarks/RESULTS.md, fourteenth session). So it stays an
    option (`jslora bench --gil-switch-interval`)."""
    gc.collect()
    gc.freeze()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
