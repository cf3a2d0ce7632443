"""The engine's configuration and warm-up: which kernels and how many compile threads EngineConfig takes,
and that warm-up compiles every step variant ahead so that requests compile nothing."""
from __future__ import annotations

import pytest

from jslora import LLM, SamplingParams
from jslora.engine import EngineConfig


@pytest.mark.parametrize("tp", [1, 2])
def test_warmup_compiles_the_steps_in_threads_once_and_runs_them_without_compiling(tp, caplog):
    """Warm-up compiles every step variant ahead on several threads, then runs each: the runs find their
    executables compiled (no backend compile inside a step's launch), under tensor parallelism too, and
    requests afterwards compile nothing. Its log names the row counts it compiles for."""
    import jax

    compiles, counting = [], [False]
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if counting[0] and name.endswith("backend_compile_duration")
        else None)
    llm = LLM("dummy:tiny", {"a": "dummy:8"}, max_lora_rank=16, max_model_len=128,
              engine=dict(max_batch=4, num_pages=2048, max_num_batched_tokens=32, compile_threads=3,
                          tensor_parallel_size=tp), warmup=False)
    runner, launched = llm.engine.runner, []
    run = runner.run

    def counted_run(batch, filtered=False):
        counting[0], before = True, len(compiles)
        out = run(batch, filtered)
        launched.append(len(compiles) - before)
        return out

    runner.run = counted_run
    compile_steps = runner.compile_steps
    ahead = []

    def counted_compile_steps(batches, threads, progress=False):
        counting[0], before = True, len(compiles)
        compile_steps(batches, threads, progress)
        ahead.append((len(batches), threads, len(compiles) - before))

    runner.compile_steps = counted_compile_steps
    try:
        with caplog.at_level("INFO", logger="jslora.engine"):
            llm.engine.warmup(progress=False)
        assert "3 decode-only row counts (1, 2, 4) and 2 with prompt chunks (16, 32)" in caplog.text  # the log says
        (variants, threads, compiled_ahead), = ahead
        assert threads == 3
        assert compiled_ahead >= variants == len(launched) and sum(launched) == 0
        out = llm.generate([[5, 6, 7] * 5, [9] * 40], ["a", None], SamplingParams(max_tokens=4, temperature=0.0))
        assert all(len(o.token_ids) == 4 for o in out) and llm.engine.compiles_after_warmup == 0
    finally:
        counting[0] = False


def test_engine_config_refuses_a_negative_compile_thread_count():
    with pytest.raises(ValueError, match="compile_threads"):
        EngineConfig(compile_threads=-1)
    assert EngineConfig().compile_threads == 0  # automatic: up to 8 on a GPU, 2 on the CPU


def test_engine_config_refuses_a_negative_prefetch_depth():
    with pytest.raises(ValueError, match="prefetch_depth"):
        EngineConfig(prefetch_depth=-1)
    assert EngineConfig(prefetch_depth=0).prefetch_depth == 0  # no adapter read ahead of admission


def test_the_kernels_default_comes_from_the_environment_and_tensor_parallelism_takes_pallas(monkeypatch):
    """EngineConfig.kernels: explicit wins; None takes JSLORA_KERNELS (else pallas); under tensor parallelism
    the default is pallas (the reference LoRA does not run there) and an explicit reference is refused."""
    monkeypatch.setenv("JSLORA_KERNELS", "reference")
    assert EngineConfig().kernels == "reference" and EngineConfig(kernels="pallas").kernels == "pallas"
    assert EngineConfig(tensor_parallel_size=2).kernels == "pallas"
    with pytest.raises(ValueError, match="Pallas kernels only"):
        EngineConfig(kernels="reference", tensor_parallel_size=2)
    monkeypatch.delenv("JSLORA_KERNELS")
    assert EngineConfig().kernels == "pallas"
    monkeypatch.setenv("JSLORA_KERNELS", "triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig()


def test_a_gpu_allocator_without_a_memory_budget_is_reported_not_served_silently(monkeypatch, caplog):
    """The pool's default size comes from the device's memory budget. An allocator that reports none on a
    GPU (XLA's VMM allocator may not) leaves the CPU's small default, with a warning naming num_pages;
    the budget, when there is one, sizes it."""
    import jax

    llm = LLM("dummy:tiny", max_model_len=128, engine=dict(max_batch=4, num_pages=2048, max_num_batched_tokens=32),
              warmup=False)
    runner = llm.engine.runner

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [Device({})])
    with caplog.at_level("WARNING", logger="jslora.engine"):
        small = runner._pages_that_fit()
    assert "num_pages" in caplog.text and small == 2 * 8 * 128 + 16 * 1024
    monkeypatch.setattr(jax, "devices", lambda: [Device({"bytes_limit": 2**32, "bytes_in_use": 0})])
    caplog.clear()
    with caplog.at_level("WARNING", logger="jslora.engine"):
        budgeted = runner._pages_that_fit()
    assert budgeted > small and not caplog.text


def test_default_buckets_pad_a_compute_bound_step_by_at_most_a_fifth():
    """Where a step's matmuls are compute-bound (above 128 decode rows, 256 step rows) padding costs their
    time in proportion: every row count a step can have pads less than one 64-row GEMM tile there, and above
    256 rows at most a fifth of its launch. S1's mixed step (~200 decode rows + ~360 prompt tokens) launches
    640 rows, not 768 as with steps of 256. Buckets are never closer than cuBLAS's row tiles."""
    from jslora.engine.sizes import MIN_BUCKET_STEP, default_buckets
    from jslora.scheduler.rows import bucket
    from pallas_kernels.pool import TILE, round_up

    decode, steps = default_buckets(256, 2048)
    assert decode == (1, 4, 8, 16, 32, 64, 128, 192, 256)
    assert steps[:5] == (16, 32, 64, 128, 256) and steps[-1] == 2048 and all(n % TILE == 0 for n in steps)
    for shapes, fine_from in ((decode, 128), (steps, 256)):
        fine = [n for n in shapes if n >= fine_from]
        assert min(b - a for a, b in zip(fine, fine[1:])) >= MIN_BUCKET_STEP
    for n in range(129, 257):
        assert bucket(n, decode) - n < MIN_BUCKET_STEP
    for n in range(256 + TILE, 2049, TILE):  # a step's rows are whole prefill tiles
        assert bucket(n, steps) - n <= bucket(n, steps) // 5
    assert bucket(round_up(200, TILE) + 352, steps) == 640
    assert default_buckets(4, 64) == ((1, 2, 4), (16, 32, 64))  # small engines: the shapes of before


def test_configured_buckets_set_the_compiled_shapes_not_the_tokens(rng):
    """decode_buckets / step_buckets (as vLLM's cudagraph_capture_sizes) replace the default row counts, capped
    by max_batch and the token budget; the padding they choose changes no token. Row counts that are not
    positive, or step rows that are not whole prefill tiles, are refused."""
    from jslora.engine.config import row_counts

    kw = dict(max_lora_rank=16, max_model_len=128)
    engine = dict(max_batch=8, num_pages=2048, max_num_batched_tokens=64)
    default = LLM("dummy:tiny", {"a": "dummy:8"}, engine=engine, warmup=False, **kw)
    custom = LLM("dummy:tiny", {"a": "dummy:8"}, warmup=False, **kw,
                 engine=EngineConfig.from_dict({**engine, "decode_buckets": [3, 6, 99], "step_buckets": [48, 32],
                                                "kernels": "pallas"}))  # row counts off the LoRA tiles
    assert default.engine.runner.decode_buckets == (1, 4, 8) and default.engine.runner.step_buckets == (16, 32, 64)
    assert custom.engine.runner.decode_buckets == (3, 6, 8) and custom.engine.runner.step_buckets == (32, 48, 64)
    prompts = [rng.integers(3, default.config.vocab_size, int(n)).tolist() for n in (3, 40, 17, 9, 25)]
    greedy = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    names = ["a", None, "a", None, "a"]
    assert ([o.token_ids for o in custom.generate(prompts, names, greedy)]
            == [o.token_ids for o in default.generate(prompts, names, greedy)])
    for bad in (dict(decode_buckets=(0, 4)), dict(step_buckets=(16, 40)), dict(step_buckets=())):
        with pytest.raises(ValueError, match="buckets"):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="fit_chunks_from"):
        EngineConfig(fit_chunks_from=-1)
    assert row_counts("16, 32,64") == (16, 32, 64)


def test_serve_and_bench_take_the_engine_default_running_batch():
    """--max-num-seqs defaults to EngineConfig.max_batch in both CLIs (one default, measured: 384 running
    sequences gave S1 +4.1% over 256 on an H100), and the H100 preset keeps it."""
    import argparse
    import json

    from jslora.bench.cli import add_bench_arguments
    from jslora.config import CONFIG_DIR
    from jslora.serve import add_serve_arguments

    for add in (add_serve_arguments, add_bench_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        assert parser.parse_args([]).max_num_seqs == EngineConfig().max_batch == 384
    with open(f"{CONFIG_DIR}/engine/h100-llama-7b.json") as f:
        assert EngineConfig.from_dict(json.load(f)).max_batch == 384
