"""Summarize XLA's CUDA-graph (command buffer) log: how often a run's steps re-recorded their graphs,
how many buffer allocations had moved each time, and what the re-recording cost.

XLA re-records a step's CUDA graph before launching it whenever a buffer the graph uses has moved
since the last launch; this script reads the log lines of that decision. Run any benchmark with

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 python benchmarks/dispatch.py ... 2> xla.log
    python benchmarks/command_buffer_log.py xla.log [--after 'compiling steps: 100%']

--after: count only the lines after the last line holding this text (the end of warm-up).
(TF_CPP_VMODULE alone printed nothing under jax 0.11.2 on the H200: its VLOG lines are INFO lines, which
jax's default minimum log level hides; the command above is untested there.)
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys


def summarize(lines: list[str]) -> dict:
    updates, update_us, update_commands, executes, initializes, evictions = collections.Counter(), [], [], 0, 0, 0
    for line in lines:
        if "Update command buffer on device" in line:
            m = re.search(r"updated_allocs=(\d+)", line)
            updates[int(m.group(1)) if m else -1] += 1
        elif m := re.search(r"Updated command buffer in (\d+)", line):
            update_us.append(int(m.group(1)))
            if c := re.search(r"num_commands=(\d+)", line):
                update_commands.append(int(c.group(1)))
        elif "Execute command buffer on device" in line:
            executes += 1
        elif "Initialized command buffer" in line:
            initializes += 1
        elif "Evicted" in line and "command buffer" in line:
            evictions += 1
    n = sum(updates.values())
    return {"executions": executes, "updates": n, "update_share": n / executes if executes else 0.0,
            "updated_allocs_histogram": dict(sorted(updates.items())),
            "update_us_mean": sum(update_us) / len(update_us) if update_us else 0.0,
            # jax 0.11.2's XLA logs no "Update command buffer on device" line (thirty-ninth session), only these
            "timed_updates": len(update_us), "update_ms_total": sum(update_us) / 1e3,
            "update_commands_mean": sum(update_commands) / len(update_commands) if update_commands else 0.0,
            "initializations": initializes, "evictions": evictions}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--after", default=None)
    args = ap.parse_args()
    lines = open(args.log, errors="replace").read().replace("\r", "\n").splitlines()
    if args.after:
        marks = [i for i, line in enumerate(lines) if args.after in line]
        lines = lines[marks[-1] + 1:] if marks else lines
    json.dump(summarize(lines), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
