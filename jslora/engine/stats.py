"""What the engine counts: totals since start (EngineStats) and one record per step for `jslora bench`'s
timeline (StepRecord, when Engine.timeline is a list)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0       # steps that carried prompt chunks
    decode_steps: int = 0        # steps that carried decode rows
    prompt_tokens: int = 0       # tokens prefilled (recomputation after preemption included)
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    dropped: int = 0             # by the scheduling policy (early abort)
    host_seconds: float = 0.0    # scheduling, metadata and dispatch
    wait_seconds: float = 0.0    # blocked on the device's tokens
    compile_seconds: float = 0.0
    step_failures: int = 0       # requests ended by a failed step (their own: see Engine._launch_isolated)


@dataclasses.dataclass
class StepRecord:
    """One engine step, for `jslora bench`'s timeline (Engine.timeline)."""
    start: float            # time.perf_counter() when the step began
    host_s: float           # scheduling, batch building and dispatch
    wait_s: float           # blocked on the previous step's tokens
    decode_rows: int
    prefill_seqs: int       # prompt chunks
    prefill_tokens: int     # prompt (or recomputed) tokens prefilled
    rows: int               # the launch's rows, padding included
    compiles: int           # step variants compiled during this step
    end: float = 0.0        # time.perf_counter() when it returned
    dispatch_s: float = 0.0  # of host_s: inside the jitted step call (packing and dispatch)
    adapters: int = 0        # distinct adapters among the step's rows (the LoRA rows it reads)
