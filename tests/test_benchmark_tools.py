"""The GPU diagnostics' CPU paths: benchmarks/dispatch.py's smoke run and the command-buffer log summary."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest

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
    assert s["timed_updates"] == 2 and s["update_ms_total"] == 2.0 and s["update_commands_mean"] == 700
    assert s["evictions"] == 1


@pytest.mark.parametrize("options", [[], ["--quantization", "fp8"]], ids=["bf16", "fp8"])
def test_dispatch_benchmark_runs_every_mode(tmp_path, monkeypatch, options):
    from benchmarks import dispatch

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["dispatch.py", "--quick", *options])
    dispatch.main()
    payload = json.loads((tmp_path / "dispatch.json").read_text())
    rows = payload["rows"]
    assert payload["quantization"] == (options[1] if options else None)
    assert [r["mode"] for r in rows] == ["new buffers", "staged", "same buffers", "eager", "alternating"]
    assert all(r["wall_ms"] > 0 and r["host_ms"] > 0 for r in rows)


def test_gemm_tune_smoke_run_tunes_every_precision(tmp_path, monkeypatch):
    """benchmarks/gemm_tune.py --quick (interpret mode): each precision and row bucket gets a config the
    kernel accepts (fma only for few rows and never with FP8 activations); nothing written to the
    kernel's tuning files off the GPU."""
    from benchmarks import gemm_tune
    from pallas_kernels import skinny_gemm

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gemm_tune.py", "--quick", "--precisions", "fp8,fp8a8,bf16"])
    monkeypatch.setitem(gemm_tune.SHAPES, "tiny", [(256, 128)])
    monkeypatch.setattr(skinny_gemm, "TUNED_DIR", str(tmp_path / "tuned"))
    gemm_tune.main()
    entries = json.loads((tmp_path / "gemm_tune.json").read_text())["entries"]
    assert {(e["precision"], e["rows"]) for e in entries} == {(p, r) for p in ("fp8", "fp8a8", "bf16")
                                                              for r in (1, 16)}
    for e in entries:
        assert e["config"]["form"] != "fma" or (e["rows"] <= 4 and e["config"]["dot_dtype"] == "x")
        assert (e["config"]["dot_dtype"] == "float8_e4m3fn") == (e["precision"] == "fp8a8")
    assert not (tmp_path / "tuned").exists()


def test_lora_tune_smoke_run_checks_every_tiling(tmp_path, monkeypatch):
    """benchmarks/lora_tune.py --quick (interpret mode): every tiling it times, the default among them,
    gives the oracle's LoRA delta."""
    from benchmarks import lora_tune

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["lora_tune.py", "--quick", "--problems", "s1_o"])
    lora_tune.main()
    rows = json.loads((tmp_path / "lora_tune.json").read_text())["results"]["s1_o"]["rows"]
    # stage 1: 2 splits x one-row products (sum, dot) + split rows at 2, and the default; 1 block; 3 per token
    assert len(rows) == 11 and any(all(r[k] == v for k, v in lora_tune.DEFAULT.items()) for r in rows)
    assert sum(r["per_token"] for r in rows) == 3 and sum(r["one_row_dot"] for r in rows) >= 4
    assert any(r["split_rows"] for r in rows) and any(r["out_block"] == 32 and r["out_loop"] == 2 and r["loads_first"]
                                                      for r in rows)
    assert all(r["rel_err"] < 1e-2 for r in rows)


def test_lora_tune_times_the_tilings_it_is_given(tmp_path, monkeypatch):
    """--tilings: the default and each given tiling on every problem, and the best S1 tiling written as
    --decode-lora-tiling takes it."""
    from benchmarks import lora_tune

    monkeypatch.setenv("OUT", str(tmp_path))
    given = [{"one_row_dot": False, "stages": 2}, {"out_block": 32, "out_loop": 2, "loads_first": False}]
    monkeypatch.setattr(sys, "argv", ["lora_tune.py", "--quick", "--problems", "s1_o,n5_qkv", "--tilings",
                                      json.dumps(given)])
    lora_tune.main()
    result = json.loads((tmp_path / "lora_tune.json").read_text())
    for name in ("s1_o", "n5_qkv"):
        rows = result["results"][name]["rows"]
        assert len(rows) == 3 and all(r["rel_err"] < 1e-2 and "kernels_us" in r for r in rows)
        assert rows[0] | result["results"][name]["default"] == rows[0]  # the engine's tiling first
        assert [r["one_row_dot"] for r in rows] == [True, False, True]
        assert [r["loads_first"] for r in rows] == [True, True, False]
    best = result["best_s1_tiling"]
    assert best["k_splits"] == 4 and set(best) <= set(lora_tune.KERNEL_DEFAULTS)


def test_kernel_ir_lists_each_kernels_launch(tmp_path, monkeypatch):
    """benchmarks/kernel_ir.py without the triton package: each variant's kernels lowered for CUDA, with
    the grids and pipeline depths the tilings ask for."""
    from benchmarks import kernel_ir

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "triton", None)  # as on CI: grids only, whatever is installed
    monkeypatch.setattr(sys, "argv", ["kernel_ir.py", "--problems", "s1_o", "--variants", "default,loads_first_loop8"])
    kernel_ir.main()
    rows = json.loads((tmp_path / "kernel_ir.json").read_text())["results"]
    assert [(r["variant"], r["name"], r["programs"], r["num_stages"]) for r in rows] == [
        ("default", "lora_shrink", 240 * 4, 2), ("default", "lora_expand", 240 * 4096 // 128, 2),
        ("loads_first_loop8", "lora_shrink", 240 * 4, 3), ("loads_first_loop8", "lora_expand", 240 * 4096 // 1024, 2)]


def test_kernel_ir_reads_decode_attention_and_counts_the_main_loops_instructions(tmp_path, monkeypatch):
    """--attention lowers the decode kernel per tiling (Llama-7B at batch 256: packed, 3 stages by default);
    loop_sass counts the instructions of the backward branch's body with the most tensor-core instructions."""
    from benchmarks import kernel_ir

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(sys, "argv", ["kernel_ir.py", "--attention", "256,512,32,32", "--kv-fp8", "--tilings",
                                      '[{}, {"pack_heads": false, "num_stages": 2}]'])
    kernel_ir.main()
    rows = json.loads((tmp_path / "kernel_ir.json").read_text())["results"]
    assert [(r["name"], r["programs"], r["num_stages"]) for r in rows] == [("paged_decode_attention", 4096, 3),
                                                                        ("paged_decode_attention", 4096, 2)]
    sass = "\n".join(f"        /*{a:04x}*/    {text} ;" for a, text in [
        (0x10, "MOV R1, c[0x0][0x28]"), (0x20, "HMMA.16816.F32 R4, R8, R12, R4"), (0x30, "FADD R2, R2, R3"),
        (0x40, "@P0 BRA 0x20"),                                   # the main loop: 3 instructions, one HMMA
        (0x50, "IADD3 R5, R5, 0x1, RZ"), (0x60, "@P1 BRA 0x50"),  # a loop without tensor-core work
        (0x70, "EXIT")])
    assert kernel_ir.loop_sass(sass) == 3
    assert kernel_ir.loop_sass("") == 0


def test_adapter_copy_benchmark_times_both_sources(tmp_path, monkeypatch):
    """benchmarks/adapter_copy.py on the CPU: one adapter's rows copied from NumPy and from pinned host
    memory, idle and beside a busy device loop."""
    from benchmarks import adapter_copy

    monkeypatch.setenv("OUT", str(tmp_path))
    rows = adapter_copy.main(["--model", "tiny", "--ranks", "8", "--repeats", "2", "--step-ms", "5"])["rows"]
    assert {r["source"] for r in rows} == {"numpy", "pinned"}
    assert all(r["idle_ms"] > 0 and r["busy_ms"] > 0 and r["mb"] > 0 for r in rows)
    assert json.loads((tmp_path / "adapter_copy.json").read_text())["rows"] == rows


def test_host_step_benchmark_times_each_part_of_a_step(tmp_path, monkeypatch):
    """benchmarks/host_step.py: the S1 trace through the real scheduler, with each step's batch built from
    Llama-7B's LoRA page tables and packed, every part timed."""
    from benchmarks import host_step

    monkeypatch.setenv("OUT", str(tmp_path))
    out = host_step.main(["--num-adapters", "20", "--rate", "20", "--duration", "2", "--max-batch", "16",
                          "--num-blocks", "4096"])
    assert out["steps"] > 10 and out["requests"] > 10 and out["adapter_loads"] > 0
    assert set(out["parts"]) == {"schedule", "step_batch", "pack_batch", "total"}
    assert all(0 < r["p50_ms"] <= r["max_ms"] for r in out["parts"].values())
    assert json.loads((tmp_path / "host_step.json").read_text())["steps"] == out["steps"]


def test_copy_bubble_benchmark_runs_every_mode(tmp_path, monkeypatch):
    """benchmarks/copy_bubble.py on the CPU: pipelined steps with and without adapter-sized copies beside
    them, from NumPy and from pinned host memory."""
    from benchmarks import copy_bubble

    monkeypatch.setenv("OUT", str(tmp_path))
    rows = copy_bubble.main(["--mb", "0.5", "--rate", "50", "--seconds", "0.3", "--step-ms", "5",
                             "--matrix", "128"])["rows"]
    assert [r["mode"] for r in rows] == list(copy_bubble.MODES)
    assert rows[0]["copies"] == 0 and all(r["copies"] > 0 and "ms_lost_per_copy" in r for r in rows[1:])
    assert all(r["steps"] > 0 and r["ms_per_step"] > 0 for r in rows)


def test_adapter_load_benchmark_sets_the_switch_interval(tmp_path, monkeypatch):
    """benchmarks/adapter_load.py: a PEFT read alone and beside a busy thread, at the switch interval asked."""
    import sys

    from benchmarks import adapter_load

    monkeypatch.setenv("OUT", str(tmp_path))
    before = sys.getswitchinterval()
    try:
        row = adapter_load.main(["--model", "tiny", "--rank", "4", "--repeats", "1", "--switch-interval", "0.002",
                                  "--seconds", "0.5"])
    finally:
        sys.setswitchinterval(before)
    assert row["switch_interval_s"] == 0.002 and row["alone_ms"] > 0 and row["beside_busy_thread_ms"] > 0


def test_trace_bound_arithmetic():
    """benchmarks/trace_bound.py: the KV and flop totals from the trace, and adapter bytes that shrink as a
    scheduler may group more queued requests by adapter."""
    import numpy as np
    import pytest

    from benchmarks import trace_bound
    from jslora.bench.trace import TraceRequest
    from jslora.config import ModelConfig

    cfg = ModelConfig.named("tiny")
    trace = [TraceRequest(0.0, "a", 10, 3), TraceRequest(0.1, "b", 4, 2, prefix_len=2)]
    got = trace_bound.bound(trace, cfg, {"a": 4, "b": 8}, batch=1, distinct=1.0, copy_rate=1e9, matmul_rate=1e12)
    kv_tokens = (10 + 11 + 12) + (6 + 7)  # each decode token reads its context's K and V
    assert got["kv_tb"] * 1e12 == kv_tokens * cfg.num_layers * 2 * cfg.kv_width * 2
    assert got["gemm_tflop"] * 1e12 == 2 * trace_bound.linear_params(cfg) * (10 + 3 + 6 + 2)
    assert got["steps"] == 5 and got["adapter_gb_per_step"] * 1e9 == pytest.approx(
        np.mean([trace_bound.adapter_bytes(cfg, 4), trace_bound.adapter_bytes(cfg, 8)]))

    labels = np.array(["a", "b", "a", "c", "a", "b", "d", "e"])
    assert trace_bound.distinct_fcfs(labels, 4) == pytest.approx(np.mean([3, 3, 3, 4, 4]))  # windows from 0..4
    assert trace_bound.distinct_grouped(labels, 3, 8) == 1 < trace_bound.distinct_grouped(labels, 4, 8) == 2

    rows = trace_bound.main(["--setting", "S2", "--num-adapters", "2000", "--batch", "200", "--queues", "400,800"])
    ratio = {r["system"]: r["req_s"] / rows[0]["req_s"] for r in rows}
    assert ratio["jslora fcfs"] < ratio["jslora grouped 400"] < ratio["jslora grouped 800"] < 1

    # the reference decodes `batch` rows at the trace's mean decode context and runs no prompt: with prompts as
    # long as the outputs (S1's lengths) the trace's own GEMM rows double, so it stays well under 1
    from benchmarks.trace_bound import decode_context
    ref_step = max(2 * trace_bound.linear_params(cfg) / 1e12, trace_bound.linear_params(cfg) * 2 / 1e9) + (
        decode_context(trace) * cfg.num_layers * 2 * cfg.kv_width * 2 + got["adapter_gb_per_step"] * 1e9) / 1e9
    assert got["reference_tok_s"] == pytest.approx(1 / ref_step)
    assert got["trace_over_reference"] == pytest.approx(got["tok_s"] / got["reference_tok_s"])
    s1 = trace_bound.main(["--setting", "S1", "--num-adapters", "5", "--batch", "232", "--duration", "20"])
    assert all(0.7 < r["trace_over_reference"] < 0.85 for r in s1)


def test_adapter_pack_benchmark_runs():
    from benchmarks import adapter_pack

    out = adapter_pack.main(["--model", "tiny", "--ranks", "4,8", "--repeats", "1"])
    assert set(out) == {4, 8} and all(r["ms"] > 0 and r["mb"] > 0 for r in out.values())


def test_kernel_kinds_sort_gemm_lora_attention_and_the_rest():
    from jslora.bench.timeline import seconds_by_kind

    ops = {"nvjet_sm90_tst_128x8_64x12_4x1_v_bz_NNT": 1.0, "gemm_fusion_dot": 0.5,
           "void cublasLt::splitKreduce_kernel": 0.25, "lora_shrink": 0.2, "lora_expand": 0.1,
           "paged_decode_attention": 0.3, "write_kv": 0.05,
           "wrapped_concatenate": 0.04, "MemcpyH2D": 0.01}
    kinds = seconds_by_kind(ops)
    assert kinds == {"GEMM": 1.75, "LoRA": 0.2 + 0.1, "attention": 0.35, "other": 0.05}
    assert abs(sum(kinds.values()) - sum(ops.values())) < 1e-12


def test_engine_benchmark_profiles_steps_with_and_without_lora(tmp_path, monkeypatch):
    """benchmarks/engine.py --quick: every (adapters, batch) row is measured with a full batch, and the
    profiled batch's steps are traced with and without LoRA (device time by kind: zero on a CPU)."""
    from benchmarks import engine

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["engine.py", "--quick", "--skip-warmup", "--profile-batch", "4", "--chunk", "0"])
    engine.main()
    rows = json.loads((tmp_path / "engine.json").read_text())["rows"]
    assert [(r["distinct_adapters"], r["batch"], r["lora_in_step"]) for r in rows] == [
        (0, 1, False), (0, 4, False), (1, 1, True), (1, 4, True), (3, 4, True)]
    profiled = [r for r in rows if r["device_ms_by_kind"] is not None]
    assert [(r["batch"], r["lora_in_step"]) for r in profiled] == [(4, False), (4, True), (4, True)]
    assert all(set(r["device_ms_by_kind"]) == {"GEMM", "LoRA", "attention", "other"} for r in profiled)
    assert all(r["device_ms"] > 0 and r["preemptions"] == 0 for r in rows)


def by_probe(rows, probe: str, key: str):
    return next(r[key] for r in rows if r["probe"] == probe)


def test_gather_probe_checks_every_probe(tmp_path, monkeypatch):
    """benchmarks/gather_probe.py --quick (interpret mode): each probe reads exactly the rows it names
    (its row sums equal NumPy's), and the shrink runs beside them."""
    from benchmarks import gather_probe

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gather_probe.py", "--quick", "--problems", "s1_o"])
    gather_probe.main()
    rows = json.loads((tmp_path / "gather_probe.json").read_text())["rows"]
    assert [r["probe"] for r in rows] == [*gather_probe.PROBES, *gather_probe.GATHERS, *gather_probe.SHRINKS,
                                          *gather_probe.GROUPS, *gather_probe.EXPANDS,
                                          *["read_pallas", "read_xla"] * 2]
    assert all(r["rel_err"] < 1e-2 for r in rows)
    # two tiles a program: half the programs, the same bytes
    assert by_probe(rows, "g16pair_k256_s4", "programs") * 2 == by_probe(rows, "g8_k256_s4", "programs")
    assert by_probe(rows, "g16pair_k256_s4", "bytes") == by_probe(rows, "g8_k256_s4", "bytes")
    by_name = {r["probe"]: r for r in rows}
    masked = by_name["pages_masked"]["bytes"]
    assert by_name["pages_all16"]["bytes"] == 2 * masked and by_name["rank_block8"]["bytes"] == masked
    assert by_name["one_split"]["programs"] * 4 == by_name["pages_masked"]["programs"]


def test_engine_profile_tells_one_layers_gemms_apart(tmp_path):
    """engine.py's profile sums a trace's kernels by op and also by (op, duration): four GEMMs of one
    name but two durations come out as two lines with their launches a step, and launches a step by kind."""
    import gzip

    from benchmarks.engine import device_time_by_op

    gpu = {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}
    host = {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}
    kernels = [{"ph": "X", "pid": 7, "name": f"gemm_fusion_dot.{i}", "dur": dur, "ts": i * 100}
               for i, dur in enumerate([14.2, 14.1, 40.0, 39.9])]
    kernels += [{"ph": "X", "pid": 7, "name": "lora_shrink", "dur": 5.0, "ts": 900},
                {"ph": "X", "pid": 1, "name": "gemm_fusion_dot.9", "dur": 99.0, "ts": 0}]  # host: not a kernel
    (tmp_path / "run").mkdir()
    with gzip.open(tmp_path / "run" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": [gpu, host, *kernels]}, f)
    by_op, kinds, histogram, launches = device_time_by_op(str(tmp_path), steps=2)
    assert launches == pytest.approx({"GEMM": 2.0, "LoRA": 0.5, "attention": 0.0, "other": 0.0})
    assert by_op == pytest.approx({"gemm_fusion_dot": 108.2e-3 / 2, "lora_shrink": 5e-3 / 2})
    assert kinds == pytest.approx({"GEMM": 108.2e-3 / 2, "LoRA": 2.5e-3, "attention": 0.0, "other": 0.0})
    assert [(name, us, count) for name, us, count, _ in histogram] == [
        ("gemm_fusion_dot", 40.0, 1.0), ("gemm_fusion_dot", 14.0, 1.0), ("lora_shrink", 5.0, 0.5)]
    assert histogram[0][3] == pytest.approx(79.9e-3 / 2)


def test_xla_modes_runs_a_setting_again_in_a_cache_of_its_own(tmp_path, monkeypatch):
    """benchmarks/xla_modes.py: "default-2" is the default flags run again; --own-cache gives each name
    its own compilation cache (so its GEMMs are autotuned apart), the same name the same cache."""
    import subprocess

    from benchmarks import xla_modes

    calls, allocators = [], []

    def fake_run(cmd, env, **kw):
        calls.append((cmd, env["XLA_FLAGS"]))
        allocators.append(env.get("XLA_PYTHON_CLIENT_ALLOCATOR"))
        return subprocess.CompletedProcess(cmd, 1, "", "no GPU here")

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(xla_modes.subprocess, "run", fake_run)
    assert xla_modes.flags_of("pdl_off-3") == xla_modes.VARIANTS["pdl_off"]
    assert xla_modes.flags_of("fused_rope") == "" and xla_modes.engine_args_of("fused_rope-2") == ["--fused-rope"]
    assert xla_modes.engine_args_of("fused_both") == ["--fused-rope", "--fused-norm"]
    assert xla_modes.engine_args_of("block_level") == []
    with pytest.raises(ValueError, match="unknown variant"):
        xla_modes.engine_args_of("blok_level")
    for name in ("default-1", "default-2", "default-1"):
        result = xla_modes.run_variant(name, xla_modes.flags_of(name), ["--quick"], 10, "t", own_cache=True)
        assert result["rc"] == 1 and "engine" not in result
    caches = [cmd[cmd.index("--compilation-cache-dir") + 1] for cmd, _ in calls]
    assert caches[0] == caches[2] != caches[1]
    assert all(cmd[1] == "benchmarks/engine.py" and "--quick" in cmd for cmd, _ in calls)
    # the command-buffer update modes start XLA with the VMM allocator; the others with the default one
    result = xla_modes.run_variant("never_update", xla_modes.flags_of("never_update"), ["--quick"], 10, "t")
    assert calls[-1][1].endswith("--xla_gpu_command_buffer_update_mode=NEVER_UPDATE")
    assert allocators == [None, None, None, "vmm"] and result["env"] == {"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"}
    assert xla_modes.flags_of("vmm") == "" and xla_modes.env_of("vmm-2") == result["env"]


def test_step_parity_runs_xla_settings_in_processes_of_their_own(tmp_path, monkeypatch):
    """benchmarks/step_parity.py with XLA settings: each run (the baseline's two too) a child process with the
    setting's flags and allocator; the same engine gives the same tokens across processes, and a setting
    XLA refuses fails alone, with XLA's reason."""
    from benchmarks import step_parity, xla_modes

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", ".")
    monkeypatch.setitem(xla_modes.VARIANTS, "bogus", "--xla_gpu_command_buffer_update_mode=NO_SUCH_MODE")
    monkeypatch.setattr(sys, "argv", ["step_parity.py", "--quick", "--baseline", "default", "--others", "vmm,bogus"])
    step_parity.main()
    out = json.loads((tmp_path / "step_parity.json").read_text())
    assert out["own_processes"]
    rows = out["rows"]
    assert rows["default (again)"]["equal_requests"] == rows["vmm"]["equal_requests"] == 6
    assert "parsing failed" in rows["bogus"]["failed"]
    monkeypatch.setattr(sys, "argv", ["step_parity.py", "--quick", "--baseline", "pdl", "--others", "vmm"])
    with pytest.raises(SystemExit, match="not both"):
        step_parity.main()
    monkeypatch.setattr(step_parity, "CHILD_TIMEOUT_S", 0.01)  # a hung setting fails alone, not the call
    assert step_parity.generate_in_child("vmm", ["--quick"]) == (None, "timed out after 0.01 s")


def test_step_parity_kernel_sets_reach_the_step(monkeypatch):
    """The settings that bisect concurrent graphs (bmm_*, pallas_lora_*, reference_*) resolve to backends with
    Pallas attention without Pallas LoRA, the reverse, or neither (the CPU's --quick runs build those engines)."""
    from benchmarks import step_parity
    from jslora.engine import EngineConfig
    from jslora.model import backend

    monkeypatch.setattr(backend, "BACKENDS", dict(backend.BACKENDS))  # the diagnostics stay in this test
    monkeypatch.setattr(step_parity, "BACKENDS", backend.BACKENDS)
    step_parity.register_backends()
    expected = {"reference": (False, False), "bmm": (True, False), "pallas_lora": (False, True)}
    assert set(expected) == set(step_parity.KERNEL_SETS)
    for short, (attention, lora) in expected.items():
        for name in (f"{short}_serial", f"{short}_concurrent"):
            config = EngineConfig(**step_parity.SETTINGS[name])
            chosen = backend.BACKENDS[config.kernels]
            assert (chosen.pallas_attention, chosen.pallas_lora) == (attention, lora)
            assert config.concurrent_graphs == name.endswith("concurrent")


@pytest.mark.parametrize("kv_fp8", [False, True])
def test_attention_benchmark_problems_hold_every_kv_head_and_the_engines_page_runs(kv_fp8):
    """benchmarks/attention.py's pools: an FP8 pool is as wide as the bf16 one (every KV head's key and value,
    packed, as the engine lays them: a narrower pool would time fewer heads than it reports), and --block lays
    a sequence's tokens on runs of consecutive pages, every page used once."""
    from benchmarks import attention
    from pallas_kernels.kv_fp8 import unpack_rows

    kv_heads, batch, context, block = 2, 3, 32, 16
    pool, k_all, v_all, num_pages = attention.problem(jax.random.PRNGKey(0), batch, context, kv_heads, 2, kv_fp8,
                                                      pool_pages=400, block=block)
    width = kv_heads * attention.HEAD_DIM
    assert pool.shape == (num_pages, width) and num_pages == 400
    if kv_fp8:
        assert (k_all == v_all).all()   # a token's key and value on one page
        keys = unpack_rows(pool[1:], width)
        assert keys.shape == (399, width) and np.isfinite(np.asarray(keys)).all() and np.asarray(keys).std() > 0.5
    pages = np.concatenate([np.asarray(k_all).ravel(), np.asarray(v_all).ravel() if not kv_fp8 else []])
    assert len(set(pages.tolist())) == pages.size and pages.min() >= 1 and pages.max() < num_pages
    runs = np.asarray(k_all).reshape(-1, block)
    assert (np.diff(runs, axis=1) == 1).all()


@pytest.mark.parametrize("argv", [["attention", "--kv-fp8", "--tiling", '{"prefetch_pages": true}'],
                                  ["lora", "--problem", "s1_qkv", "--tiling", '{"shrink_warps": 2}']])
def test_ncu_driver_calls_the_kernel_alone(monkeypatch, capsys, argv):
    """benchmarks/ncu_kernels.py --quick (interpret mode): the kernel Nsight Compute is to profile runs at the
    tiling given (its quick mode shrinks attention.py's and lora_tune.py's shapes; restored after)."""
    from benchmarks import attention, lora_tune, ncu_kernels

    monkeypatch.setattr(attention, "HEAD_DIM", attention.HEAD_DIM)
    monkeypatch.setattr(lora_tune, "H", lora_tune.H)
    monkeypatch.setattr(lora_tune, "PROBLEMS", lora_tune.PROBLEMS)
    monkeypatch.setattr(sys, "argv", ["ncu_kernels.py", *argv, "--quick", "--calls", "2"])
    ncu_kernels.main()
    assert capsys.readouterr().out.startswith(f"{argv[0]}: 2 calls")


def test_step_parity_agreement_tells_near_ties_from_drift():
    """step_parity.agreement: where tokens agree, the largest drift of the top logprob; where they first
    differ, the baseline's top-1 - top-2 gap (a near-tie flips on a rounding change, a wide gap does not)."""
    from benchmarks.step_parity import agreement, drift_note

    base = {"tokens": [[1, 2, 3], [4, 5, 6]],
            "logprobs": [[[-0.1, -2.0], [-0.2, -0.9], [-0.3, -1.0]], [[-0.5, -3.0], [-0.40, -0.42], [-1.0, -2.0]]]}
    other = {"tokens": [[1, 2, 3], [4, 7, 6]],
             "logprobs": [[[-0.1, -2.0], [-0.23, -0.9], [-0.3, -1.0]], [[-0.49, -3.0], [-0.41, -0.40], [-1.0, -2.0]]]}
    row = agreement(base, other)
    assert row["equal_requests"] == 1 and row["first_differences"] == [1]
    assert row["max_logprob_drift"] == pytest.approx(0.03)     # request 0, token 1; request 1's flip not counted
    assert row["mean_logprob_drift"] == pytest.approx((0.03 + 0.01) / 4)
    assert row["gaps_at_first_differences"] == [pytest.approx(0.02)]
    assert "top-2 gaps at the differences 0.02" in drift_note(row)
    assert "max_logprob_drift" not in agreement({"tokens": [[1]], "logprobs": None}, {"tokens": [[1]]})


def test_overlap_probe_forms_equal_the_plain_chain(tmp_path, monkeypatch):
    """benchmarks/overlap_probe.py --quick (interpret mode): every form that runs both the GEMMs and the LoRA
    (in place, beside, beside without the barrier) gives the chain over plain-jnp LoRA, and each form is timed."""
    from benchmarks import overlap_probe

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["overlap_probe.py", "--quick"])
    overlap_probe.main()
    results = json.loads((tmp_path / "overlap_probe.json").read_text())["results"]
    assert set(results) == {f"{form}/serial" for form in overlap_probe.FORMS}
    both = ("in_place", "beside", "beside_epilogue")
    assert all(results[f"{form}/serial"]["rel_err"] < 2e-2 for form in both)  # bf16 through 2 layers
    assert all(r["ms"] > 0 for r in results.values()) and "overlap_won_ms" in results["beside/serial"]


def test_pdl_probe_chain_adds_one_per_kernel(tmp_path, monkeypatch):
    """benchmarks/pdl_probe.py --quick (interpret mode): the chain of in-place Pallas kernels between XLA
    fusions gives x + kernels, with and without the grid wait (the check a launch that reads too early would fail
    on the GPU)."""
    from benchmarks import pdl_probe

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["pdl_probe.py", "--quick"])
    pdl_probe.main()
    results = json.loads((tmp_path / "pdl_probe.json").read_text())["results"]
    # the wait is PTX: in interpret mode it passes its index on unchanged
    assert all(results[f"no_pdl/{kind}"]["max_err"] < 1e-5 for kind in ("plain", "wait"))
