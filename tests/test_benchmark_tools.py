"""The GPU diagnostics' CPU paths: benchmarks/dispatch.py's smoke run and the command-buffer log summary."""
from __future__ import annotations

import json
import sys

from benchmarks.command_buffer_log import summarize


def test_command_buffer_log_summary():
    lines = [
        "I1201 command_buffer_thunk.cc:210] Execute command buffer on device #0; num_executions=1",
        "I1201 command_buffer_thunk.cc:190] Update command buffer on device #0 by recoding command buffer cmd "
        "sequence after 1 executions since last update; num_commands=700; updated_allocs=2",
        "I1201 command_buffer_thunk.cc:201] Updated command buffer in 1900 μs; num_commands=700",
        "I1201 command_buffer_thunk.cc:210] Execute command buffer on device #0; num_executions=1",
        "I1201 command_buffer_thunk.cc:190] Update command buffer on device #0 ...; updated_allocs=5",
        "I1201 command_buffer_thunk.cc:201] Updated command buffer in 100 μs; num_commands=700",
        "I1201 command_buffer_thunk.cc:210] Execute command buffer on device #0; num_executions=1",
        "I1201 command_buffer_thunk.cc:300] Evicted 3 command buffer thunk command buffers",
    ]
    s = summarize(lines)
    assert s["executions"] == 3 and s["updates"] == 2 and s["update_share"] == 2 / 3
    assert s["updated_allocs_histogram"] == {2: 1, 5: 1} and s["update_us_mean"] == 1000
    assert s["evictions"] == 1


def test_dispatch_benchmark_runs_every_mode(tmp_path, monkeypatch):
    from benchmarks import dispatch

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["dispatch.py", "--quick"])
    dispatch.main()
    rows = json.loads((tmp_path / "dispatch.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["new buffers", "staged", "same buffers", "eager", "alternating"]
    assert all(r["wall_ms"] > 0 and r["host_ms"] > 0 for r in rows)
