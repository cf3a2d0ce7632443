"""`jslora bench`: the trace generator, the metrics, and a CPU smoke run of the CLI on the tiny model."""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from jslora.bench.metrics import RequestRecord, satisfaction, summarize
from jslora.bench.trace import TraceConfig, generate_trace


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_trace_has_the_asked_rate_burstiness_and_lengths(cv):
    trace = generate_trace(TraceConfig(num_adapters=50, rate=20, cv=cv, duration=500, input_range=(8, 64),
                                       output_range=(4, 16), seed=1))
    gaps = np.diff([0.0] + [t.arrival for t in trace])
    assert len(trace) == 20 * 500
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)
    assert min(t.prompt_len for t in trace) >= 8 and max(t.prompt_len for t in trace) < 64
    assert {t.adapter for t in trace} <= {f"lora-{i}" for i in range(50)}


def test_alpha_skews_adapter_popularity():
    def top_share(alpha):
        trace = generate_trace(TraceConfig(num_adapters=100, alpha=alpha, rate=50, duration=100, seed=2))
        counts = np.bincount([int(t.adapter.split("-")[1]) for t in trace], minlength=100)
        return counts[:10].sum() / counts.sum()

    assert top_share(1.0) == pytest.approx(0.1, abs=0.02)   # uniform
    assert top_share(0.1) > 0.7                             # most traffic on the first adapters


def test_shared_prefix_trace_gives_each_adapter_its_own_system_prompt():
    from jslora.bench.replay import prompt_ids

    config = dict(num_adapters=4, rate=20, duration=5, input_range=(4, 9), seed=3)
    plain = generate_trace(TraceConfig(**config))
    shared = generate_trace(TraceConfig(**config, shared_prefix=(32, 64)))
    assert [(t.arrival, t.adapter, t.prompt_len) for t in plain] == [(t.arrival, t.adapter, t.prompt_len)
                                                                     for t in shared]  # the same trace besides
    prompts = prompt_ids(shared, vocab_size=500)
    by_adapter = {}
    for t, p in zip(shared, prompts):
        assert 32 <= t.prefix_len < 64 and len(p) == t.prefix_len + t.prompt_len
        by_adapter.setdefault(t.adapter, set()).add(tuple(p[: t.prefix_len]))
    assert all(len(prefixes) == 1 for prefixes in by_adapter.values())  # one system prompt per adapter
    assert len({next(iter(p)) for p in by_adapter.values()}) == len(by_adapter)  # each its own


def test_shared_prefix_bench_hits_the_cache_and_the_system_without_it_does_not(tmp_path):
    from jslora.cli import main

    main(["bench", "--quick", "--systems", "jslora,no-prefix-cache", "--num-adapters", "3",
          "--shared-prefix", "48,80", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    rows = {r["system"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["jslora"]["finished"] == rows["jslora"]["requests"] > 10
    assert rows["jslora"]["prefix_cache_hit_rate"] > 0.5, rows["jslora"]
    assert rows["no-prefix-cache"]["finished"] == rows["no-prefix-cache"]["requests"]
    assert "prefix_cache_hit_rate" not in rows["no-prefix-cache"]


def test_metrics():
    assert satisfaction(0.0, 6.0) == 1.0 and satisfaction(3.0, 6.0) == 0.75 and satisfaction(6.5, 6.0) == 0.0
    records = [RequestRecord(0.0, "a", "a", 10, 5, 1.0, 2.0), RequestRecord(1.0, "b", "b", 10, 5, 9.0, 10.0),
               RequestRecord(2.0, "b", "b", 10, 0, None, None, error="dropped")]
    s = summarize(records, wall_s=10.0, slo_s=6.0)
    assert s["finished"] == 2 and s["dropped"] == 1
    assert s["throughput_req_s"] == 0.2 and s["throughput_tok_s"] == 1.0
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["user_satisfaction"] == pytest.approx((1 - (1 / 6) ** 2) / 3)
    assert s["latency_avg_s"] == pytest.approx(5.5)


def test_gc_pauses_are_timed():
    from jslora.bench.timeline import GcPauses

    with GcPauses() as pauses:
        gc.collect()
        gc.collect()
    gc.collect()  # closed: not counted
    assert pauses.collections == 2 and pauses.seconds > 0


def test_the_timeline_finds_the_steps_whose_host_time_left_the_device_idle():
    """A step whose collect did not block (the device was done before the host had launched the next
    step) counts as unwaited, with its host time; the host time's percentiles show the spikes."""
    from jslora.bench.timeline import summarize_timeline
    from jslora.engine.stats import StepRecord

    host_ms = [5.0] * 95 + [40.0] * 5              # five spikes
    wait_ms = [20.0] * 95 + [0.0] * 5              # ... whose collects found the tokens ready
    records, t = [], 0.0
    for host, wait in zip(host_ms, wait_ms):
        records.append(StepRecord(t, host / 1e3, wait / 1e3, 200, 0, 0, 208, 0, end=t + (host + wait) / 1e3))
        t += (host + wait) / 1e3
    records.append(StepRecord(t, 1e-3, 0.0, 0, 0, 0, 0, 0, end=t + 1e-3))  # an empty step: not counted
    summary = summarize_timeline(records, wall_s=t + 1e-3)
    assert summary["unwaited_share"] == 5 / 100 and summary["unwaited_host_ms_avg"] == 40.0
    assert summary["host_ms_p50"] == 5.0 and summary["host_ms_max"] == 40.0 and summary["host_ms_p99"] == 40.0


def test_device_activity_merges_streams_and_sums_an_op_over_its_layers(tmp_path):
    import gzip

    from jslora.bench.timeline import device_activity

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    kernels = [("gemm_fusion_dot.12", 0, 30, "step_a"), ("gemm_fusion_dot.40", 20, 30, "step_a"),  # overlap
               ("paged_decode_attention", 60, 20, "step_b"), ("loop_add_fusion_3", 90, 10, "step_b")]
    events = meta + [{"ph": "X", "pid": 1, "name": n, "ts": t, "dur": d, "args": {"hlo_module": m}}
                     for n, t, d, m in kernels]
    events.append({"ph": "X", "pid": 2, "name": "dispatch", "ts": 0, "dur": 100})
    events.append({"ph": "X", "pid": 2, "name": "stop_trace", "ts": 100, "dur": 900})  # not GPU idle time
    # step_b's launch returned inside the idle [50, 60): that gap waited for the host
    events.append({"ph": "X", "pid": 2, "name": "PjRtStreamExecutorRawLoadedExecutable::Execute", "ts": 40,
                   "dur": 15})
    (tmp_path / "run").mkdir()
    with gzip.open(tmp_path / "run" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = device_activity(str(tmp_path))
    assert out["window_s"] == pytest.approx(100e-6)
    assert out["gpu_busy_s"] == pytest.approx(80e-6)  # [0, 50) + [60, 80) + [90, 100)
    assert out["kernel_s_by_op"] == pytest.approx({"gemm_fusion_dot": 60e-6, "paged_decode_attention": 20e-6,
                                                   "loop_add_fusion": 10e-6})
    assert out["kernel_s_by_program"] == pytest.approx({"step_a": 60e-6, "step_b": 30e-6})
    assert out["kernel_s_by_kind"] == pytest.approx({"GEMM": 60e-6, "LoRA": 0.0, "attention": 20e-6, "other": 10e-6})
    assert out["kernel_calls_by_op"] == {"gemm_fusion_dot": 2, "paged_decode_attention": 1, "loop_add_fusion": 1}
    assert out["host_events"] == [("stop_trace", 1, 900e-6), ("dispatch", 1, 100e-6),
                                  ("PjRtStreamExecutorRawLoadedExecutable::Execute", 1, 15e-6)]
    assert out["idle_s_launched_in_gap"] == pytest.approx(10e-6)  # [50, 60) only, not [80, 90)
    # idle [50, 60) after the longer-running gemm (ends at 50), [80, 90) inside step_b
    assert [(b, a, n) for b, a, n, _ in out["idle_s_between"]] == [
        ("step_a:gemm_fusion_dot", "step_b:paged_decode_attention", 1),
        ("step_b:paged_decode_attention", "step_b:loop_add_fusion", 1)]
    assert [s for *_, s in out["idle_s_between"]] == pytest.approx([10e-6, 10e-6])
    # each gap with what ran around it: the launch returning inside [50, 60) is beside the first
    first = out["longest_gaps"][0]
    assert first["us"] == 10 and ("gpu", None, "gemm_fusion_dot.40", -30, 0) in first["gpu"]
    assert any(h[2].endswith("LoadedExecutable::Execute") for h in first["host"])


def test_bench_cli_smoke(tmp_path, capsys):
    """Every system on a short trace of the tiny model: all requests finish, JSON and plots written."""
    from jslora.cli import main

    main(["bench", "--quick", "--systems", "jslora,base-only,bmm,peft-style,no-unified,merged",
          "--num-adapters", "2,5", "--out", str(tmp_path), "--no-progress", "--preload",
          "--adapter-prefetch-depth", "3"])
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = payload["rows"]
    assert payload["args"]["adapter_prefetch_depth"] == 3
    assert {r["system"] for r in rows} == {"jslora", "base-only", "bmm", "peft-style", "no-unified", "merged"}
    for r in rows:
        assert r["finished"] == r["requests"] > 0, r
        assert r["throughput_tok_s"] > 0 and 0 < r["slo_attainment"] <= 1
    lora_rows = [r for r in rows if r["system"] == "jslora"]
    assert all(r["adapter_loads"] >= 1 and r["preloaded"] == 5 for r in lora_rows)
    assert all(r["adapter_source_loads"] == 0 for r in lora_rows)  # all were in host RAM already
    for r in (r for r in rows if r["system"] != "merged"):  # the step timeline of every engine run
        t = r["timeline"]
        assert t["steps"] > 0 and 0 < t["running_batch_avg_busy"] <= 16 and 0 <= t["padding_share"] < 1, t
        assert t["compiles"] == 0, "a step compiled after warm-up"
        assert 0 < t["engine_share"] <= 1 and t["host_ms_per_step"] > 0
        assert 0 < t["dispatch_ms_per_step"] < t["host_ms_per_step"]  # the jitted call is part of the host's time
        assert t["gc_ms_per_step"] >= 0 and t["gc_collections"] >= 0
        assert (t["distinct_adapters_avg"] > 0) == (r["system"] != "base-only"), t  # LoRA rows read per step
        ref = r["reference_decode"]  # the same engine's plain decode at the run's batch, the trace against it
        assert ref["batch"] == max(1, round(t["running_batch_avg"])) and ref["tokens"] == ref["batch"] * ref["steps"]
        assert r["trace_over_reference"] == pytest.approx(r["throughput_steady_tok_s"] / ref["tok_s"])
    assert (tmp_path / "throughput_vs_adapters.png").stat().st_size > 1000
    assert (tmp_path / "first_token_latency_cdf.png").stat().st_size > 1000
    assert "req/s" in capsys.readouterr().out


def test_base_only_steps_launch_no_lora_kernel():
    """The base-only upper bound is the engine without LoRA: no targets in its steps, so no LoRA kernel
    launches on empty tiles (0.23 ms of an S1 step on the H200 when it had jslora's fixed targets)."""
    from jslora.bench.systems import engine_options_for
    from jslora.engine import EngineConfig

    base = EngineConfig(max_batch=4, max_model_len=64, lora_targets=("q", "k", "v", "o"))
    config, _ = engine_options_for("base-only", base)
    assert config.lora_targets == () and engine_options_for("jslora", base)[0].lora_targets == ("q", "k", "v", "o")


def test_decode_context_weighs_requests_by_their_decode_steps():
    from jslora.bench.reference import decode_context
    from jslora.bench.trace import TraceRequest

    trace = [TraceRequest(0.0, None, 10, 3, prefix_len=5), TraceRequest(1.0, "a", 100, 1)]
    contexts = [15, 16, 17, 100]  # each decode step's context: prompt (with prefix) + tokens out so far
    assert decode_context(trace) == pytest.approx(np.mean(contexts))


def test_decode_rate_runs_the_asked_batch_and_leaves_the_engine_empty():
    from jslora.bench.reference import decode_rate
    from jslora.llm import LLM

    llm = LLM("dummy:tiny", {"a": "dummy:4", "b": "dummy:8"}, max_model_len=128)
    engine = llm.engine
    out = decode_rate(engine, batch=3.4, context=20, adapters=["a", "b", None], vocab_size=llm.config.vocab_size,
                      steps=5)
    assert out["batch"] == 3 and out["context"] == 20 and out["tokens"] == 3 * 5 and out["tok_s"] > 0
    assert not engine.has_unfinished() and engine.memory_stats()["running"] == 0


def test_ten_thousand_registered_adapters_are_made_on_demand(tmp_path):
    """The issue's 10,000 adapters through the same tiers: registered up front, generated from their
    seed on first use (a tiny host tier, 8 resident at once), so nearly every request reads its own."""
    import sys

    from jslora.cli import main

    before = sys.getswitchinterval()
    try:  # the loaders' GIL switch interval (jslora.engine.serving_process) is the bench's to set
        main(["bench", "--quick", "--systems", "jslora", "--num-adapters", "10000", "--rate", "20",
              "--host-adapter-gb", "0.001", "--max-adapters", "8", "--gil-switch-interval", "0.0007",
              "--out", str(tmp_path), "--no-progress", "--no-plots"])
        assert sys.getswitchinterval() == 0.0007
    finally:
        sys.setswitchinterval(before)
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["num_adapters"] == 10000 and row["finished"] == row["requests"] >= 40
    assert row["adapter_source_loads"] >= 0.9 * row["requests"]  # 10,000 adapters: repeats are rare
    assert row["adapter_evictions"] >= row["adapter_loads"] - 8


def test_adapters_served_from_peft_directories_on_disk(tmp_path):
    """--adapter-dir: the bench writes each adapter as a PEFT directory (3 weight files per rank, the
    other directories hard-linked to them) and the engine reads them from disk on first use, through a
    host tier too small to keep them (every request past the first few reads its adapter's files)."""
    from jslora.cli import main

    root = tmp_path / "adapters"
    main(["bench", "--quick", "--systems", "jslora", "--num-adapters", "40", "--rate", "12",
          "--adapter-dir", str(root), "--adapter-distinct-files", "3", "--host-adapter-gb", "0.0001",
          "--max-adapters", "4", "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"])
    (row,) = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert row["finished"] == row["requests"] > 20 and "error" not in row
    assert row["adapter_source_loads"] >= row["requests"] // 2
    dirs = sorted(root.iterdir())
    assert len(dirs) == 40 and all((d / "adapter_config.json").exists() for d in dirs)
    links = [(d / "adapter_model.safetensors").stat().st_nlink for d in dirs]
    assert all(n > 1 for n in links)  # 3 files per rank, 20 directories each: every file is shared
    assert len({(d / "adapter_model.safetensors").stat().st_ino for d in dirs}) == 6
    from jslora.config import ModelConfig
    from jslora.loading.peft_adapter import load_peft_adapter

    adapter = load_peft_adapter(dirs[0], ModelConfig.named("tiny"), 16)
    assert adapter.rank in (4, 8) and set(adapter.targets) == {"q", "k", "v", "o"}


def test_a_failing_system_keeps_the_others_results_and_memory_is_given_back(tmp_path, monkeypatch):
    """A sweep goes on past a system that fails, and each system's pool is released before the next
    is built (two pools of a large model do not fit on one GPU)."""
    import weakref

    from jslora.bench import systems
    from jslora.cli import main

    built, original = [], systems.build_system

    def tracking(*a, **kw):
        system = original(*a, **kw)
        built.append(weakref.ref(system))
        return system

    monkeypatch.setattr(systems, "build_system", tracking)
    main(["bench", "--quick", "--systems", "jslora,no-such-system,base-only", "--num-adapters", "2",
          "--out", str(tmp_path), "--no-progress", "--no-plots"])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["jslora", "no-such-system", "base-only"]
    assert "unknown system" in rows[1]["error"] and rows[2]["finished"] == rows[2]["requests"]
    assert len(built) == 2 and all(ref() is None or ref().runner.pool is None for ref in built)


def test_hf_peft_replays_the_same_trace(tmp_path, monkeypatch):
    """benchmarks/peft_trace.py: HF transformers + peft on the trace, same metrics (CPU, tiny model)."""
    from benchmarks.peft_trace import main

    monkeypatch.setenv("OUT", str(tmp_path))
    row = main(["--quick"])["rows"][0]
    assert row["system"] == "hf-peft" and row["finished"] == row["requests"] > 0
    assert (tmp_path / "peft_trace.json").exists()

    # with a time cap of zero no batch starts: every request counts as not served, none is lost
    capped = main(["--quick", "--max-wall", "0"])["rows"][0]
    assert capped["requests"] == row["requests"] and capped["finished"] == 0 and capped["dropped"] == row["requests"]


def test_replay_reports_counts_without_the_progress_bar():
    """replay_engine's report lines (the bench prints them when the bar is off) count what finished, what
    is running and queued, and the engine's steps, so a log cut short tells a stalled replay from a slow one."""
    import types

    from jslora.bench.replay import replay_engine
    from jslora.bench.trace import TraceRequest
    from jslora.request import RequestOutput, RequestUpdate

    class OneStepEngine:  # every request finishes in the step after it is added, one request a step
        model_config = types.SimpleNamespace(vocab_size=100)

        def __init__(self):
            self.scheduler = types.SimpleNamespace(running=[], waiting=[])
            self.stats = types.SimpleNamespace(steps=0)

        def add_request(self, prompt, sampling, adapter, **_):
            request = types.SimpleNamespace(request_id=f"r{len(self.scheduler.waiting)}-{self.stats.steps}")
            self.scheduler.waiting.append(request)
            return request

        def has_unfinished(self):
            return bool(self.scheduler.waiting or self.scheduler.running)

        def step(self):
            self.stats.steps += 1
            done = self.scheduler.running[:1]
            self.scheduler.running = self.scheduler.running[1:] + self.scheduler.waiting
            self.scheduler.waiting = []
            output = RequestOutput.__new__(RequestOutput)
            output.metrics, output.token_ids, output.error = {}, [1], None
            return [RequestUpdate(r.request_id, [1], True, "length", output) for r in done]

    trace = [TraceRequest(0.0, None, 4, 1) for _ in range(3)]
    lines: list[str] = []
    records, _ = replay_engine(OneStepEngine(), trace, progress=False, report=lines.append, report_every_s=0.0)
    assert all(r is not None for r in records)
    assert lines[0] == "0/3 finished, 0 added and unfinished (0 running, 0 waiting), 0 steps"
    assert lines[1] == "0/3 finished, 3 added and unfinished (3 running, 0 waiting), 1 steps"
    assert lines[-1].startswith("2/3 finished, 1 added and unfinished (1 running, 0 waiting)")
