"""Host time of one step's dispatch, by how its metadata reaches the device (Llama shapes, dummy weights).

    PYTHONPATH=. python benchmarks/dispatch.py --model llama-7b --batch 4 --adapters 4   # GPU: $OUT/dispatch.json
    PYTHONPATH=. python benchmarks/dispatch.py --quick                                   # CPU smoke run

XLA runs a step as CUDA graphs and re-records, before each launch, every graph node that reads a buffer
which moved since the last launch. B decoding requests (one adapter each when --adapters) give one
decode step, launched --calls times back to back in each mode:

  new buffers   the packed metadata passed as NumPy: new device buffers every call (as the engine does)
  staged        copied first into persistent device buffers, in place (a donated copy), then read there
  same buffers  the same device buffers every call (no input moves)
  eager         new buffers, the step compiled without CUDA graphs (EngineConfig.enforce_eager)
  alternating   two executables of the same step taking turns, each with its own staged buffers (each
                graph then sees the allocations of every other call: an update of a graph still running
                may be what waits)

For XLA's own account of which buffers moved, run with TF_CPP_MIN_LOG_LEVEL=0
TF_CPP_VMODULE=command_buffer_thunk=3 and summarize stderr with benchmarks/command_buffer_log.py.

host ms = the dispatch call's own time; wall ms = elapsed per call over the run, device finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, write_json
from jslora.config import ModelConfig
from jslora.engine import Engine, EngineConfig
from jslora.loading.model import load_model
from jslora.loading.peft_adapter import dummy_adapter
from jslora.model.packing import pack_batch
from jslora.model.paged import _STEP_JIT, _step_entry, jitted_step, step
from jslora.sampling import SamplingParams

# the metadata's persistent buffers are donated, so the copy lands at their address (keep_unused: jit would
# otherwise prune the unused argument and its donation with it)
_write_in_place = jax.jit(lambda persistent, packed: packed, donate_argnums=0, keep_unused=True)


def time_calls(runner, launch, calls: int) -> dict:
    pool, slot_state = runner.pool, runner.slot_state
    for _ in range(5):  # compile, record the graphs
        pool, slot_state, out = launch(pool, slot_state)
    out.block_until_ready()
    host = []
    t0 = time.perf_counter()
    for _ in range(calls):
        t1 = time.perf_counter()
        pool, slot_state, out = launch(pool, slot_state)
        host.append(time.perf_counter() - t1)
    out.block_until_ready()
    wall = (time.perf_counter() - t0) / calls
    runner.pool, runner.slot_state = pool, slot_state
    return {"host_ms": float(np.mean(host) * 1e3), "host_ms_p90": float(np.percentile(host, 90) * 1e3),
            "wall_ms": wall * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=4, help="distinct r=16 adapters on q,k,v,o (0: no LoRA)")
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--quantization", choices=("fp8",), default=None,
                    help="FP8 base weights (EngineConfig.quantization): their step's dispatch took 6.9 ms a step at S1 "
                         "on an H100 against 3.2-3.4 with bf16 weights (RESULTS.md, thirty-eighth session)")
    ap.add_argument("--quick", action="store_true", help="tiny model (CPU smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.calls = "tiny", 8
    cfg = ModelConfig.named(args.model)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    params = load_model(f"dummy:{args.model}", dtype).params
    engine = Engine(params, cfg, dtype, EngineConfig(max_batch=max(8, args.batch), max_model_len=512,
                                                     max_num_batched_tokens=512, num_pages=None if on_gpu else 4096,
                                                     quantization=args.quantization))
    names = [None]
    if args.adapters:
        lora = dummy_adapter(cfg, 16, ("q", "k", "v", "o"), seed=1)
        names = [f"a{i}" for i in range(args.adapters)]
        for name in names:
            engine.register_adapter(name, lora)
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    requests = [engine.add_request(rng.integers(3, cfg.vocab_size, 64).tolist(), sp, names[i % len(names)])
                for i in range(args.batch)]
    while not all(len(r.generated) >= 2 for r in requests):
        engine.step()
    runner = engine.runner
    batch = runner.step_batch(requests, [], engine.residency)
    fixed = tuple(jax.device_put(b) for b in pack_batch(batch)[0])
    layout = pack_batch(batch)[1]
    eager_spec = dataclasses.replace(runner.spec, eager=True)
    persistent = [tuple(jnp.zeros_like(b) for b in fixed)]

    def staged(pool, slot_state):
        persistent[0] = _write_in_place(persistent[0], pack_batch(batch)[0])
        return jitted_step(batch.num_rows)(runner.params, runner.spec, pool, slot_state, persistent[0], layout)[:3]

    # a second executable of the same step (a jit object of its own compiles its own CUDA graphs)
    twins = (jitted_step(batch.num_rows), jax.jit(_step_entry, **_STEP_JIT))
    turn = [0, [tuple(jnp.zeros_like(b) for b in fixed) for _ in twins]]

    def alternating(pool, slot_state):
        i = turn[0] = 1 - turn[0]
        turn[1][i] = _write_in_place(turn[1][i], pack_batch(batch)[0])
        return twins[i](runner.params, runner.spec, pool, slot_state, turn[1][i], layout)[:3]

    modes = {
        "new buffers": lambda pool, ss: step(runner.params, runner.spec, pool, ss, batch)[:3],
        "staged": staged,
        "same buffers": lambda pool, ss: jitted_step(batch.num_rows)(runner.params, runner.spec, pool, ss, fixed,
                                                                      layout)[:3],
        "eager": lambda pool, ss: step(runner.params, eager_spec, pool, ss, batch)[:3],
        "alternating": alternating,
    }
    rows = []
    for mode, launch in modes.items():
        rows.append({"mode": mode, **time_calls(runner, launch, args.calls)})
    payload = {"env": environment(), "model": args.model, "batch": args.batch, "adapters": args.adapters,
               "quantization": args.quantization,
               "rows_per_step": batch.num_rows, "calls": args.calls, "rows": rows}
    path = write_json("dispatch.json", payload)
    print(f"\n{args.model}, batch {args.batch}, {args.adapters} adapters, {args.quantization or 'bf16'} weights, "
          f"{args.calls} calls")
    print(f"{'mode':>14} {'host ms':>8} {'host p90':>8} {'wall ms':>8}")
    for r in rows:
        print(f"{r['mode']:>14} {r['host_ms']:8.3f} {r['host_ms_p90']:8.3f} {r['wall_ms']:8.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
