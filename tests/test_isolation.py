"""Tenant isolation in the engine: nothing one request leaves in the pool, and no failure of one request,
reaches another request's output (the engine on the Pallas kernels in interpret mode)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jslora import LLM, SamplingParams
from jslora.engine import EngineConfig
from jslora.loading.peft_adapter import AdapterError, LoraAdapter, dummy_adapter
from pallas_kernels.kv_fp8 import phases_of, unpack_rows, value_offset

from serving import run_until_done

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def small_pool_llm(**options) -> LLM:
    """A pool of 40 blocks (640 pages): finished requests' pages are reused by the next ones at once."""
    engine = EngineConfig(kernels="pallas", max_batch=8, max_model_len=96, max_num_batched_tokens=128,
                          num_pages=41 * 16, max_lora_rank=16, max_adapters=6, watermark=0.0, **options)
    return LLM("dummy:tiny", {"a": "dummy:8", "b": "dummy:16:q,v,gate,down"}, dtype="float32", engine=engine)


@pytest.fixture(scope="module")
def llm():
    return small_pool_llm()


def normal_traffic(llm, rng, n=6):
    prompts = [rng.integers(3, llm.config.vocab_size, int(rng.integers(5, 40))).tolist() for _ in range(n)]
    return prompts, [[None, "a", "b"][i % 3] for i in range(n)]


def overflowing_adapter(llm, name) -> LoraAdapter:
    """Finite weights (they pass every load-time check) so large that the adapter's activations overflow
    to Inf, and then to NaN, in every layer of its own requests."""
    adapter = dummy_adapter(llm.config, 8, ("q", "k", "v", "o", "gate", "up", "down"), seed=3, name=name)
    return dataclasses.replace(adapter, weights={t: (a * 1e18, b * 1e18) for t, (a, b) in adapter.weights.items()})


def poison_host_copy(llm, name: str) -> None:
    """What a loader bug could let through: the adapter's pool rows replaced by NaN after registration."""
    store = llm.engine.store
    store.host_copy(store.get(name)).page_data[:] = np.nan


def pool_holds_nan(llm) -> bool:
    """Whether any pool row holds a NaN: a float NaN, or, in an FP8 cache, a NaN key or value byte (packed into
    the words, which a NaN byte need not make a float NaN)."""
    pool = llm.engine.runner.pool
    if jnp.isnan(pool).any():
        return True
    if llm.engine.config.kv_cache_dtype != "fp8":
        return False
    width = pool.shape[1]
    values = pool[:, value_offset(width, phases_of(pool.dtype)):]
    return bool(jnp.isnan(unpack_rows(pool, width)).any() | jnp.isnan(unpack_rows(values, width)).any())


def test_nan_and_inf_tenants_leave_other_tenants_outputs_unchanged(llm, rng):
    nan_and_inf_tenants_leave_others_unchanged(llm, rng)


def test_nan_and_inf_tenants_with_the_fused_kernels_and_an_fp8_kv_cache(rng):
    """The same with EngineConfig.fused_rope, fused_norm and kv_cache_dtype="fp8": the hostile rows' keys and
    values, rotated by pallas_kernels.rope_kv and packed as FP8 (saturated, or NaN), land on their own pages
    only, and pallas_kernels.rms_norm normalizes each row by its own sum of squares."""
    nan_and_inf_tenants_leave_others_unchanged(small_pool_llm(fused_rope=True, fused_norm=True, kv_cache_dtype="fp8"),
                                               rng)


def nan_and_inf_tenants_leave_others_unchanged(llm, rng):
    prompts, adapters = normal_traffic(llm, rng)
    clean = [o.token_ids for o in llm.generate(prompts, adapters, GREEDY)]
    llm.add_adapter("inf", overflowing_adapter(llm, "inf"))
    llm.add_adapter("nan", "dummy:4:q,k,v,o")
    poison_host_copy(llm, "nan")

    # hostile requests interleaved with the same normal traffic, in one batch and several steps
    hostile_prompts = [rng.integers(3, llm.config.vocab_size, 30).tolist() for _ in range(4)]
    mixed = llm.generate(hostile_prompts[:2] + prompts + hostile_prompts[2:],
                         ["nan", "inf"] + adapters + ["inf", "nan"],
                         [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)] * 2 + [GREEDY] * len(prompts)
                         + [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)] * 2)
    assert [o.token_ids for o in mixed[2:-2]] == clean
    assert all(0 <= t < llm.config.vocab_size for o in mixed for t in o.token_ids)
    assert pool_holds_nan(llm), "the hostile requests should have left NaN in freed pages (else this tests nothing)"

    # after they finished, their NaN pages are reused by the next requests: still the same outputs
    again = llm.generate(prompts, adapters, GREEDY)
    assert [o.token_ids for o in again] == clean
    stats = llm.engine.memory_stats()
    assert stats["kv_blocks"] == 0 and stats["running"] == stats["waiting"] == 0  # no page leaked
    llm.remove_adapter("inf")
    llm.remove_adapter("nan")


def test_free_pages_full_of_nan_change_nothing(llm, rng):
    prompts, adapters = normal_traffic(llm, rng, n=5)
    clean = [o.token_ids for o in llm.generate(prompts, adapters, GREEDY)]
    engine = llm.engine
    free_pages = np.concatenate([engine.allocator.pages([b]) for b in engine.allocator.free_blocks()])
    layout = engine.layout
    rows = (np.arange(layout.num_layers)[:, None] * layout.num_pages + free_pages[None]).ravel()
    engine.runner.pool = engine.runner.pool.at[rows].set(jnp.nan)
    assert [o.token_ids for o in llm.generate(prompts, adapters, GREEDY)] == clean


def test_a_failing_launch_fails_only_its_own_request(llm, rng):
    prompts, adapters = normal_traffic(llm, rng)
    clean = [o.token_ids for o in llm.generate(prompts, adapters, GREEDY)]
    engine = llm.engine
    bad = SamplingParams(max_tokens=5)
    object.__setattr__(bad, "top_k", 2**40)  # past validation (a bug, say): its metadata cannot be built
    requests = [engine.add_request(p, GREEDY, a) for p, a in zip(prompts[:3], adapters[:3])]
    requests.append(engine.add_request(prompts[0], bad, "a"))
    requests += [engine.add_request(p, GREEDY, a) for p, a in zip(prompts[3:], adapters[3:])]
    outputs = run_until_done(engine, requests)
    failed = outputs[requests[3].request_id]
    assert failed.finish_reason == "abort" and failed.error_status == 500 and "OverflowError" in failed.error
    others = [outputs[r.request_id] for i, r in enumerate(requests) if i != 3]
    assert [o.token_ids for o in others] == clean and all(o.error is None for o in others)
    assert engine.stats.step_failures == 1
    assert engine.memory_stats()["kv_blocks"] == 0


def test_an_adapter_file_broken_after_registration_fails_only_its_requests(llm, rng, tmp_path, checkpoints):
    """The host tier re-reads adapters from disk; a file replaced by garbage since must fail the
    requests that name it (400) and nothing else."""
    import shutil

    from safetensors.numpy import load_file, save_file

    mha = LLM(str(checkpoints["mha"]["dir"]), dtype="float32",
              engine=EngineConfig(kernels="pallas", max_batch=8, max_model_len=96, num_pages=41 * 16, max_lora_rank=16,
                                  host_adapter_bytes=1, watermark=0.0))  # a host tier that keeps one adapter
    for name in ("r4_qv", "r8_all_rslora"):
        shutil.copytree(checkpoints["mha"]["adapters"][name], tmp_path / name)
        mha.add_adapter(name, str(tmp_path / name))
    prompt = rng.integers(3, mha.config.vocab_size, 20).tolist()
    clean = mha.generate([prompt, prompt], [None, "r8_all_rslora"], GREEDY)
    weights = tmp_path / "r4_qv" / "adapter_model.safetensors"
    save_file({k: np.full_like(v, np.nan) for k, v in load_file(weights).items()}, weights)
    mha.engine.store.drop_host_copy(mha.engine.store.get("r4_qv"))  # as the host LRU would
    outs = mha.generate([prompt, prompt, prompt], [None, "r4_qv", "r8_all_rslora"], GREEDY)
    assert outs[1].finish_reason == "abort" and outs[1].error_status == 400
    assert "NaN" in outs[1].error and "r4_qv" in outs[1].error
    assert [outs[0].token_ids, outs[2].token_ids] == [c.token_ids for c in clean]


def test_non_finite_adapters_are_refused_at_load(llm):
    adapter = dummy_adapter(llm.config, 4, ("q", "v"), seed=1, name="x")
    a, b = adapter.weights["v"]
    b = b.copy()
    b[1, 2, 3] = np.inf
    with pytest.raises(AdapterError, match="NaN or infinite"):
        llm.add_adapter("x", dataclasses.replace(adapter, weights={**adapter.weights, "v": (a, b)}))
    assert not llm.has_adapter("x")


def test_a_step_that_loses_the_pool_fails_the_running_requests_and_the_engine_goes_on(llm, rng, monkeypatch):
    """A failure on the device after the pool was donated: the requests that were running fail with an
    error (500), never silently; queued ones (a request preempted while its token was in flight too) go
    on with their normal outputs, and so do the next requests. Several rounds: the pool is small, so
    some rounds preempt and some do not."""
    engine, runner = llm.engine, llm.engine.runner
    run = runner.run

    def lose_pool(batch, filtered=False):  # the donated pool is gone, as after a failed execution
        runner.pool.delete()
        raise RuntimeError("device step failed")

    for _ in range(12):
        prompts, adapters = normal_traffic(llm, rng, n=3)
        clean = [o.token_ids for o in llm.generate(prompts, adapters, GREEDY)]
        requests = [engine.add_request(p, GREEDY, a) for p, a in zip(prompts, adapters)]
        engine.step()  # prefill
        monkeypatch.setattr(runner, "run", lose_pool)
        with pytest.raises(RuntimeError, match="device step failed"):
            for _ in range(3):
                engine.step()
        monkeypatch.setattr(runner, "run", run)
        updates = engine.recover_device_state("internal error in an engine step")
        failed = {u.request_id: u.output for u in updates}
        assert failed and all(o.finish_reason == "abort" and o.error_status == 500 and o.error
                              for o in failed.values())
        outputs = run_until_done(engine, [r for r in requests if r.request_id not in failed])
        for i, r in enumerate(requests):
            if r.request_id not in failed:
                assert outputs[r.request_id].token_ids == clean[i]
        assert [o.token_ids for o in llm.generate(prompts, adapters, GREEDY)] == clean
        assert engine.memory_stats()["kv_blocks"] == 0
