"""S-LoRA's tensor-parallel experiment (issue: TP scaling run): req/s of jslora, of jslora without
LoRA's all-gathers, and of the base model alone, for each TP size the machine has GPUs for.

    PYTHONPATH=. python benchmarks/tp_scaling.py --setting S5 --tp 2,4 --num-adapters 10,100
    XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. python benchmarks/tp_scaling.py --quick

Each row is one `jslora bench` replay (same trace for all); the share of time in LoRA communication
is 1 - (req/s with it) / (req/s without it). Writes $OUT/tp_scaling.json; prints a table last.
"""
from __future__ import annotations

import argparse
import os

from benchmarks.common import write_json
from jslora.bench.cli import add_bench_arguments, run_bench


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="S5")
    ap.add_argument("--tp", default="2,4")
    ap.add_argument("--num-adapters", default="10,100")
    ap.add_argument("--rate", default="6")
    ap.add_argument("--duration", default="60")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU devices")
    args = ap.parse_args(argv)
    out = os.environ.get("OUT", ".")
    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        for variant, extra in (("jslora", []), ("jslora, no LoRA communication", ["--no-lora-communication"]),
                               ("base model", None)):
            bench = argparse.ArgumentParser()
            add_bench_arguments(bench)
            common = ["--tensor-parallel-size", str(tp), "--rate", args.rate, "--duration", args.duration,
                      "--num-adapters", args.num_adapters, "--preload", "--no-plots", "--no-progress",
                      "--out", os.path.join(out, f"tp{tp}_{variant.split(',')[0].replace(' ', '_')}"
                                                 f"{'_nocomm' if extra else ''}")]
            common += ["--quick"] if args.quick else ["--setting", args.setting]
            systems = ["--systems", "base-only" if extra is None else "jslora"]
            payload = run_bench(bench.parse_args(common + systems + (extra or [])))
            for row in payload["rows"]:
                rows.append({"tp": tp, "variant": variant, **{k: row.get(k) for k in (
                    "num_adapters", "throughput_req_s", "throughput_tok_s", "latency_avg_s", "first_token_avg_s",
                    "error")}})
    for row in rows:
        if row["variant"] == "jslora":
            without = next((r for r in rows if r["tp"] == row["tp"] and r["num_adapters"] == row["num_adapters"]
                            and r["variant"].startswith("jslora, no")), None)
            if without and without["throughput_req_s"] and row["throughput_req_s"]:
                row["lora_communication_share"] = 1 - row["throughput_req_s"] / without["throughput_req_s"]
    path = write_json("tp_scaling.json", {"setting": "tiny" if args.quick else args.setting, "rows": rows})
    print(f"\n{'TP':>3} {'variant':>30} {'n':>5} {'req/s':>7} {'tok/s':>7} {'LoRA comm share':>15}")
    for r in rows:
        share = r.get("lora_communication_share")
        print(f"{r['tp']:>3} {r['variant']:>30} {str(r['num_adapters']):>5} {r['throughput_req_s'] or 0:7.2f} "
              f"{r['throughput_tok_s'] or 0:7.0f} {'' if share is None else f'{share:15.3f}'}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
