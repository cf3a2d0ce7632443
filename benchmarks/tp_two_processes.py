"""Multi-host tensor parallelism on one machine: N processes, one GPU each, joined by jax.distributed into
one TP = N engine, as a multi-host deployment runs it; then TP = 1 in this process on the same GPU kind,
and the two compared as benchmarks/tp_correctness.py compares them (prompt and decode logprobs of a
mixed-adapter batch, greedy tokens).

    PYTHONPATH=. python benchmarks/tp_two_processes.py --model llama-7b --processes 2
    PYTHONPATH=. python benchmarks/tp_two_processes.py --quick          # CPU: 2 processes, 1 CPU device each

Writes $OUT/tp_two_processes.json; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import types


def worker(args) -> None:
    """One process of the TP engine (jax is imported only now: the device choice must come first)."""
    if args.quick:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.worker)
    import jax

    if args.quick:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.worker)
    assert jax.device_count() == args.processes and jax.local_device_count() == 1
    from benchmarks.tp_correctness import run

    t0 = time.perf_counter()
    outputs = run(args.model, args.processes, args)
    seconds = time.perf_counter() - t0
    if args.worker == 0:
        with open(args.result, "w") as f:
            json.dump({"seconds": seconds, "outputs": [
                {"token_ids": o.token_ids, "logprobs": o.logprobs, "prompt_logprobs": o.prompt_logprobs}
                for o in outputs]}, f)
    jax.distributed.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.model, args.prompt, args.tokens = "tiny", 24, 6
    if args.worker is not None:
        return worker(args)

    out = os.environ.get("OUT", ".")
    result = os.path.join(out, "tp_two_processes_worker0.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    command = [sys.executable, __file__, "--model", args.model, "--processes", str(args.processes), "--prompt",
               str(args.prompt), "--tokens", str(args.tokens), "--port", str(port), "--result", result]
    procs = [subprocess.Popen(command + ["--worker", str(i)] + (["--quick"] if args.quick else []),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(args.processes)]
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed:\n" + "\n".join(log[-3000:] for log in logs))
    multi_s = time.perf_counter() - t0
    with open(result) as f:
        worker0 = json.load(f)

    if args.quick:  # this process: one CPU device for TP = 1
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from benchmarks.common import environment, write_json
    from benchmarks.tp_correctness import compare, run

    on_gpu = jax.default_backend() == "gpu"
    tolerance = args.tolerance or (0.1 if on_gpu else 1e-3)
    single = run(args.model, 1, args)
    multi = [types.SimpleNamespace(**o) for o in worker0["outputs"]]
    row = {"model": args.model, "processes": args.processes, **compare(single, multi, tolerance),
           "workers_wall_s": multi_s, "worker0_generate_s": worker0["seconds"]}
    row["ok"] = row["prompt_logprob_max_diff"] <= tolerance and row["divergences_not_near_ties"] == 0
    write_json("tp_two_processes.json", {"environment": environment(), "tolerance": tolerance, "row": row})
    print(f"\n{args.processes} processes x 1 {jax.devices()[0].device_kind} (jax.distributed) vs 1 device; "
          f"tolerance {tolerance}")
    print(f"{'model':>10} {'prompt max diff':>15} {'decode max diff':>15} {'greedy agree':>12} {'ok':>4} "
          f"{'workers s':>9}")
    print(f"{row['model']:>10} {row['prompt_logprob_max_diff']:>15.4f} {row['decode_logprob_max_diff']:>15.4f} "
          f"{row['greedy_agree']:>12.2f} {'yes' if row['ok'] else 'NO':>4} {multi_s:>9.1f}")
    if not row["ok"]:
        raise SystemExit("the multi-process engine differs from TP = 1 beyond the tolerance")


if __name__ == "__main__":
    main()
