"""The engine (Pallas kernels in interpret mode) against the plain reference model, under memory
pressure: a pool so small that adapters are evicted and reloaded and requests are preempted."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jslora import LLM, SamplingParams
from jslora.engine import EngineConfig
from jslora.loading.peft_adapter import dummy_adapter

from serving import run_until_done

GREEDY_KW = dict(temperature=0.0, ignore_eos=True)


def idle_blocks(engine) -> int:
    """Blocks no request holds: free, cached adapters, and cached prompt KV (both evictable)."""
    return engine.allocator.num_free + engine.residency.blocks_in_use + engine.prefix_cache.reclaimable_blocks


def dummy_specs(rng, n):
    """n dummy adapters of mixed ranks (1..16) and target sets, MLP targets included."""
    target_sets = ["q,v", "q,k,v,o", "o,gate,up,down", "q,k,v,o,gate,up,down", "k,down"]
    return {f"d{i}": f"dummy:{int(rng.choice([1, 3, 8, 12, 16]))}:{target_sets[i % len(target_sets)]}"
            for i in range(n)}


@pytest.fixture(scope="module")
def gqa_llm(checkpoints):
    """The GQA checkpoint (Llama-3 rope, tied embeddings) with its 4 PEFT adapters and 16 dummy ones,
    in a pool of 60 blocks (960 pages): far too small for the traffic below."""
    ck = checkpoints["gqa"]
    rng = np.random.default_rng(0)
    adapters = {**{name: path for name, path in ck["adapters"].items()}, **dummy_specs(rng, 16)}
    engine = EngineConfig(kernels="pallas", max_batch=16, max_model_len=128, max_num_batched_tokens=128,
                          num_pages=61 * 16, max_lora_rank=16, max_adapters=8, host_adapter_bytes=200_000,
                          watermark=0.0)
    return LLM(str(ck["dir"]), adapters, dtype="float32", engine=engine)


@pytest.mark.parametrize("steps_in_flight", [1, 2])
def test_engine_matches_reference_under_memory_pressure(gqa_llm, rng, monkeypatch, steps_in_flight):
    """Preemption, eviction, penalties and prompt logprobs against the reference, token for token; with
    two steps in flight too (the host reads a step's tokens two launches later)."""
    llm = gqa_llm
    engine = llm.engine
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, steps_in_flight=steps_in_flight))
    start_free = idle_blocks(engine)  # the module's engine: adapters of an earlier test may be cached
    in_flight, step = [], engine.step
    monkeypatch.setattr(engine, "step", lambda: (step(), in_flight.append(len(engine._in_flight)))[0])
    names = llm.adapters + [None] * 4
    n_requests = 56
    prompts = [rng.integers(3, llm.config.vocab_size, int(rng.integers(1, 48))).tolist() for _ in range(n_requests)]
    # a third with penalties: their per-slot token counts must survive preemption and recomputation
    penalties = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.3)
    # and a fifth ask for their prompt's logprobs (test_openai_extras preempts one on purpose)
    samplings = [SamplingParams(max_tokens=int(rng.integers(1, 28)), **GREEDY_KW, **(penalties if i % 3 == 0 else {}),
                                prompt_logprobs=2 if i % 5 == 1 else None) for i in range(n_requests)]
    chosen = [names[int(rng.integers(len(names)))] for _ in range(n_requests - 6)] + ["late"] * 6

    requests = [engine.add_request(p, sp, a) for p, sp, a in zip(prompts[:40], samplings[:40], chosen[:40])]

    def register_midway(step):
        if step == 5:  # an adapter registered during traffic, then used by the requests that follow
            llm.add_adapter("late", "dummy:5:q,k,v,o,gate,up,down")
            requests.extend(engine.add_request(p, sp, a) for p, sp, a in zip(prompts[40:], samplings[40:], chosen[40:]))

    outputs = run_until_done(engine, requests, register_midway)
    assert max(in_flight) == steps_in_flight  # the steps whose tokens the host had not read yet
    ours = [outputs[r.request_id] for r in requests]
    reference = llm.generate_reference(prompts, chosen, samplings)
    for i, (o, ref) in enumerate(zip(ours, reference)):
        assert o.token_ids == ref.token_ids, f"request {i} (adapter {chosen[i]}, prompt {len(prompts[i])})"
        assert o.finish_reason == "length" and len(o.token_ids) == samplings[i].max_tokens
        if samplings[i].prompt_logprobs is None:
            assert o.prompt_logprobs is None
            continue
        assert len(o.prompt_logprobs) == len(prompts[i]) and o.prompt_logprobs[0] is None
        for got, want in zip(o.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert abs(got[0] - want[0]) < 1e-4 and got[1] == want[1], (i, got, want)

    stats = engine.memory_stats()
    used = {a for a in chosen if a is not None}
    assert stats["preemptions"] > 0, stats
    assert stats["adapter_evictions"] > 0 and stats["adapter_loads"] > len(used), stats  # evicted, reloaded
    assert stats["adapter_source_loads"] > 0, stats  # the host tier dropped some and read them again
    # no page lost: only the cached adapters hold blocks once all requests are done
    assert stats["kv_blocks"] == 0 and stats["running"] == stats["waiting"] == 0
    assert idle_blocks(engine) == start_free
    assert all(r.refs == 0 for r in engine.residency.resident.values())


def test_two_steps_in_flight_stop_where_one_does(gqa_llm, rng, monkeypatch):
    """A request that ends on a stop token or a stop string while two steps are in flight ends with the
    same tokens and text as with one: the tokens computed past its end are dropped."""
    llm, engine = gqa_llm, gqa_llm.engine
    prompts = [rng.integers(3, llm.config.vocab_size, int(n)).tolist() for n in (9, 30, 17)]
    free = llm.generate(prompts, [None, "r4_qv", "d1"], SamplingParams(max_tokens=16, **GREEDY_KW))
    # each request stops on a token it generates part-way, or on that token's text
    stops = [SamplingParams(max_tokens=16, stop_token_ids=[o.token_ids[6]], **GREEDY_KW) for o in free[:2]]
    stops.append(SamplingParams(max_tokens=16, stop=[free[2].text[4:9]], **GREEDY_KW) if free[2].text[4:9]
                 else SamplingParams(max_tokens=16, stop_token_ids=[free[2].token_ids[5]], **GREEDY_KW))
    results = {}
    for depth in (1, 2):
        monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, steps_in_flight=depth))
        results[depth] = llm.generate(prompts, [None, "r4_qv", "d1"], stops)
    for one, two in zip(results[1], results[2]):
        assert (two.token_ids, two.text, two.finish_reason) == (one.token_ids, one.text, one.finish_reason)
    assert all(len(o.token_ids) < 16 for o in results[2][:2])


def test_tokens_do_not_depend_on_the_batch(gqa_llm, rng):
    llm = gqa_llm
    prompt = rng.integers(3, llm.config.vocab_size, 21).tolist()
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
    alone = llm.generate([prompt], "r8_all_rslora", sp)[0]
    others = [rng.integers(3, llm.config.vocab_size, int(rng.integers(1, 40))).tolist() for _ in range(9)]
    mixed = llm.generate(others[:4] + [prompt] + others[4:], [None, "d1", "r4_qv", "d2", "r8_all_rslora"] * 2,
                         [SamplingParams(max_tokens=9, seed=3)] * 4 + [sp] + [SamplingParams(max_tokens=5)] * 5)
    assert mixed[4].token_ids == alone.token_ids
    greedy = SamplingParams(max_tokens=10, **GREEDY_KW)
    assert (llm.generate([prompt], "d3", greedy)[0].token_ids
            == llm.generate([others[0], prompt, others[1]], ["d4", "d3", None], greedy)[1].token_ids)


@pytest.mark.parametrize("tile, tiling", [
    (16, {"one_row_dot": True, "stages": 3, "out_block": 16, "out_loop": 2, "loads_first": True,
          "expand_one_row_dot": True, "mask_rank": True}),  # ranks 4 and 8 fill part of a block of 16
    # one-row tiles in launches of their own, elementwise; the prompt rows' tiles in the others
    (16, {"kind_launches": True, "one_row_fma": True, "expand_one_row_fma": True, "mask_rank": True,
          "out_block": 16}),
    # one-row tiles' shrink and expand fused in one launch (max_lora_rank 16: one rank block)
    (16, {"fused_one_row": True, "mask_rank": True, "fused_block": 16, "fused_depth": 3}),
    # every decode row its own tile (decode_lora_tile = 1), at the default tiling: adapters shared by rows
    # are read once per row, the kernels compiled for one-row tiles only
    (1, {})])
def test_a_decode_lora_tiling_gives_the_same_tokens(gqa_llm, checkpoints, rng, tile, tiling):
    """EngineConfig.decode_lora_tiling (the options benchmarks/lora_tune.py times) and decode_lora_tile change
    how decode rows' LoRA is tiled, not what it computes: greedy tokens of a batch mixing adapters (rows alone
    in their tile, and one adapter's rows sharing one) equal the default engine's; unknown options are refused."""
    ck = checkpoints["gqa"]
    tuned = LLM(str(ck["dir"]), {n: ck["adapters"][n] for n in ("r4_qv", "r8_all_rslora")}, dtype="float32",
                engine=EngineConfig(max_batch=8, max_model_len=64, max_num_batched_tokens=64, max_lora_rank=16,
                                    decode_lora_tile=tile, decode_lora_tiling=tiling, kernels="pallas"))
    assert tuned.engine.runner.sizes.decode_lora_tile == tile
    assert dict(tuned.engine.runner.spec.decode_lora_tiling) == tiling
    prompts = [rng.integers(3, gqa_llm.config.vocab_size, n).tolist() for n in (5, 23, 9, 14)]
    names = ["r4_qv", "r8_all_rslora", "r8_all_rslora", None]
    greedy = SamplingParams(max_tokens=8, **GREEDY_KW)
    assert ([o.token_ids for o in tuned.generate(prompts, names, greedy)]
            == [o.token_ids for o in gqa_llm.generate(prompts, names, greedy)])
    with pytest.raises(ValueError, match="decode_lora_tiling"):
        EngineConfig(decode_lora_tiling={"warp_count": 8})


def test_enforce_eager_and_no_pdl_give_the_same_tokens(gqa_llm, checkpoints, rng):
    """enforce_eager compiles the steps without CUDA graphs, pdl=False without programmatic dependent
    launch, concurrent_graphs=True with XLA's CONCURRENT graph order, xla_rematerialization=True with XLA's
    rematerialization pass (off by default; compiler options, the GPU's ignored on CPU): each must reach the step
    it selects, and change no token (on the GPU: benchmarks/step_parity.py)."""
    from jslora.model.paged import jitted_step

    ck = checkpoints["gqa"]
    eager = LLM(str(ck["dir"]), {"r4_qv": ck["adapters"]["r4_qv"]}, dtype="float32",
                engine=EngineConfig(max_batch=4, max_model_len=64, max_num_batched_tokens=64, kernels="pallas",
                                    pdl=False, concurrent_graphs=True, xla_rematerialization=True),
                enforce_eager=True)
    spec, default = eager.engine.runner.spec, gqa_llm.engine.runner.spec
    assert spec.eager and not default.eager and default.pdl and not spec.pdl
    assert spec.concurrent_graphs and not default.concurrent_graphs
    assert spec.rematerialization and not default.rematerialization
    assert len({jitted_step(16, eager, pdl, concurrent, remat) for eager in (False, True) for pdl in (False, True)
                for concurrent in (False, True) for remat in (False, True)}) == 16
    assert jitted_step(16, False, True, False, False) is jitted_step(16, False, True, False, False)
    prompts = [rng.integers(3, gqa_llm.config.vocab_size, n).tolist() for n in (5, 23)]
    greedy = SamplingParams(max_tokens=8, **GREEDY_KW)
    for adapter in (None, "r4_qv"):
        assert ([o.token_ids for o in eager.generate(prompts, adapter, greedy)]
                == [o.token_ids for o in gqa_llm.generate(prompts, adapter, greedy)])


@pytest.mark.parametrize("options", [dict(fused_norm=True), dict(fused_rope=True, fused_norm=True)],
                         ids=["norm", "both"])
def test_fused_kernels_give_the_same_tokens(gqa_llm, checkpoints, rng, options):
    """fused_rope: each layer's rope and K/V write in one kernel (pallas_kernels.rope_kv) instead of XLA's rope
    and write_kv; fused_norm: each residual add and the RMSNorm after it in one (pallas_kernels.rms_norm). Either
    or both: the default engine's tokens, with and without an adapter, prompts in chunks of 16 tokens (the
    keys written in one step are read in the next)."""
    ck = checkpoints["gqa"]
    fused = LLM(str(ck["dir"]), {"r8_all_rslora": ck["adapters"]["r8_all_rslora"]}, dtype="float32",
                engine=EngineConfig(max_batch=4, max_model_len=96, max_num_batched_tokens=16, kernels="pallas",
                                    **options), warmup=False)
    for option in options:
        assert getattr(fused.engine.runner.spec, option) and not getattr(gqa_llm.engine.runner.spec, option)
    prompts = [rng.integers(3, gqa_llm.config.vocab_size, n).tolist() for n in (5, 41)]
    greedy = SamplingParams(max_tokens=8, **GREEDY_KW)
    for adapter in (None, "r8_all_rslora"):
        assert ([o.token_ids for o in fused.generate(prompts, adapter, greedy)]
                == [o.token_ids for o in gqa_llm.generate(prompts, adapter, greedy)])


def test_a_pinned_host_tier_serves_the_same_tokens(gqa_llm, checkpoints, rng):
    """host_adapter_memory="pinned" keeps the host tier's adapters in page-locked memory (a jax.Array, one
    DMA to the device) instead of NumPy: the same tokens as the reference, with adapters dropped from the
    host tier and read again; pageable is the default; an unknown kind is refused."""
    ck = checkpoints["gqa"]
    adapters = {n: ck["adapters"][n] for n in ("r4_qv", "r8_all_rslora")}
    adapters["d3"] = gqa_llm.engine.store.get("d3").source  # a dummy adapter: the same weights (seeded by name)
    pinned = LLM(str(ck["dir"]), adapters, dtype="float32",
                 engine=EngineConfig(max_batch=8, max_model_len=64, max_num_batched_tokens=64, max_lora_rank=16,
                                     max_adapters=2, host_adapter_bytes=1, host_adapter_memory="pinned"))
    store = pinned.engine.store
    host = store.host_copy(store.get("d3")).page_data
    assert isinstance(host, jax.Array) and host.sharding.memory_kind == "pinned_host"
    assert gqa_llm.engine.store.host_memory is None  # the default
    prompts = [rng.integers(3, gqa_llm.config.vocab_size, n).tolist() for n in (5, 23, 9, 14, 11)]
    names = ["r4_qv", "r8_all_rslora", "d3", None, "r4_qv"]
    greedy = SamplingParams(max_tokens=8, **GREEDY_KW)
    for batch in (slice(0, 5), slice(1, 3)):  # all at once (evicting: 2 adapter slots), then again
        ours = pinned.generate(prompts[batch], names[batch], greedy)
        reference = gqa_llm.generate_reference(prompts[batch], names[batch], greedy)
        assert [o.token_ids for o in ours] == [r.token_ids for r in reference]
    assert store.source_loads > len(adapters)  # a host tier of one adapter read them again
    with pytest.raises(ValueError, match="host_adapter_memory"):
        EngineConfig(host_adapter_memory="hbm")


def test_stream_and_abort_free_pages(gqa_llm, rng):
    llm = gqa_llm
    engine = llm.engine
    kv_free = idle_blocks(engine)
    prompt = rng.integers(3, llm.config.vocab_size, 30).tolist()
    sp = SamplingParams(max_tokens=40, **GREEDY_KW)
    full = llm.generate([prompt], "d5", sp)[0]
    streamed = []
    for update in llm.stream(prompt, "d5", sp):
        streamed += update.new_token_ids
        if len(streamed) >= 7:
            break  # closing the stream aborts the request
    assert streamed == full.token_ids[: len(streamed)]
    assert idle_blocks(engine) == kv_free

    # abort one running and one still-queued request among others; the rest finish normally
    reqs = [engine.add_request(prompt, sp, a) for a in ["d5", None, "d6", "r4_qv"]]
    engine.step()
    engine.abort(reqs[1].request_id)
    engine.abort(reqs[3].request_id)
    outputs = run_until_done(engine, reqs)
    assert outputs[reqs[1].request_id].finish_reason == "abort"
    assert outputs[reqs[3].request_id].finish_reason == "abort"
    assert outputs[reqs[0].request_id].token_ids == full.token_ids
    assert engine.memory_stats()["kv_blocks"] == 0
    assert idle_blocks(engine) == kv_free


def test_replacing_an_adapter_never_reuses_its_pages(gqa_llm, rng):
    llm = gqa_llm
    prompt = rng.integers(3, llm.config.vocab_size, 12).tolist()
    greedy = SamplingParams(max_tokens=8, **GREEDY_KW)
    llm.add_adapter("swap", "dummy:4:q,v")
    first = llm.generate([prompt], "swap", greedy)[0]
    old_uid = llm.engine.store.get("swap").uid
    assert llm.engine.residency.get(old_uid) is not None
    # same name, different weights, strong enough that greedy decoding of this tiny model must change
    llm.add_adapter("swap", dummy_adapter(llm.config, 6, ("gate", "up"), seed=1, std=1.0))
    second = llm.generate([prompt], "swap", greedy)[0]
    assert llm.engine.residency.get(old_uid) is None  # the old version's pages were freed
    assert second.token_ids == llm.generate_reference([prompt], "swap", greedy)[0].token_ids
    assert second.token_ids != first.token_ids
    llm.remove_adapter("swap")
    with pytest.raises(KeyError):
        llm.generate([prompt], "swap", greedy)


def test_pages_return_to_the_start_count_when_adapters_are_unregistered(checkpoints, rng):
    ck = checkpoints["mha"]
    llm = LLM(str(ck["dir"]), {"a": ck["adapters"]["r16_mlp_patterns"], "b": "dummy:3:q,k"}, dtype="float32",
              engine=dict(max_batch=4, max_model_len=64, num_pages=40 * 16, max_lora_rank=16))
    start = llm.engine.allocator.num_free
    prompts = [rng.integers(3, llm.config.vocab_size, int(rng.integers(1, 30))).tolist() for _ in range(10)]
    outs = llm.generate(prompts, ["a", "b", None, "a", "b"] * 2, SamplingParams(max_tokens=12, **GREEDY_KW))
    ref = llm.generate_reference(prompts, ["a", "b", None, "a", "b"] * 2, SamplingParams(max_tokens=12, **GREEDY_KW))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert llm.engine.allocator.num_free < start  # the adapters stay cached in the pool
    llm.remove_adapter("a")
    llm.remove_adapter("b")
    llm.engine.step()  # apply the unregistrations
    assert llm.engine.allocator.num_free + llm.engine.prefix_cache.reclaimable_blocks == start
    llm.engine.reset_prefix_cache()
    assert llm.engine.allocator.num_free == start


def test_request_larger_than_the_pool_is_refused(checkpoints):
    llm = LLM(str(checkpoints["mha"]["dir"]), dtype="float32",
              engine=dict(max_batch=2, max_model_len=256, num_pages=8 * 16))
    with pytest.raises(ValueError, match="page blocks"):
        llm.generate([[5] * 100], sampling=SamplingParams(max_tokens=100))
    assert llm.generate([[5] * 10], sampling=SamplingParams(max_tokens=3))[0].finish_reason == "length"


def test_a_slow_adapter_read_does_not_hold_up_the_queue(gqa_llm, rng, monkeypatch):
    """A queued request whose adapter is still being read from disk is passed over: the requests
    behind it start, and it runs (with the right tokens) once its adapter is in host RAM."""
    import threading

    from jslora.engine import adapter_store

    llm = gqa_llm
    engine = llm.engine
    llm.add_adapter("slow", "dummy:6:q,k,v,o")
    release, read = threading.Event(), adapter_store.load_adapter_spec

    def slow_read(spec, cfg, max_rank, name, *dtype):  # the store's read of an adapter's source, held back
        if name == "slow":
            assert release.wait(60)
        return read(spec, cfg, max_rank, name, *dtype)

    monkeypatch.setattr(adapter_store, "load_adapter_spec", slow_read)
    greedy = SamplingParams(max_tokens=6, **GREEDY_KW)
    prompts = [rng.integers(3, llm.config.vocab_size, 9).tolist() for _ in range(3)]
    busy = engine.add_request(prompts[0], SamplingParams(max_tokens=100, **GREEDY_KW), None)  # outlasts the wait
    engine.step()  # the device is busy: a disk read now overlaps with it
    waiting = engine.add_request(prompts[1], greedy, "slow")
    behind = engine.add_request(prompts[2], greedy, "d7")
    import time

    deadline = time.monotonic() + 60  # d7's own read may take a moment on a loaded machine
    while not behind.generated and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.01)
    assert waiting.batch_slot is None and waiting.num_computed == 0  # still waiting on its read
    assert behind.generated, "the request behind the slow read did not start"
    release.set()
    outputs = run_until_done(engine, [busy, waiting, behind])
    reference = llm.generate_reference(prompts[1:], ["slow", "d7"], greedy)
    assert outputs[waiting.request_id].token_ids == reference[0].token_ids
    assert outputs[behind.request_id].token_ids == reference[1].token_ids
    llm.remove_adapter("slow")


@pytest.mark.parametrize("held_in", ["device_put", "transfer"])
def test_a_slow_adapter_copy_to_the_device_does_not_stall_the_step_loop(gqa_llm, rng, monkeypatch, held_in):
    """A queued request whose adapter is in host RAM but whose copy to the device is still running is
    passed over while the device is busy (admitting it would block the step loop on the copy): the
    request behind it starts, and it runs, with the right tokens, once the copy is done. The copy is held
    in device_put, or after it, in the transfer (device_put returns while the transfer may still run: the
    copy counts as done only once the rows are on the device)."""
    import threading
    import time

    llm = gqa_llm
    engine = llm.engine
    llm.add_adapter("slow_copy", "dummy:5:q,k,v,o")
    runner, release, copy = engine.runner, threading.Event(), engine.runner.adapter_rows
    held = []

    def hold_once():
        if not held:
            held.append(True)
            assert release.wait(60)

    def slow_copy(page_data):  # the stager thread's host -> device copy, held back once
        if held_in == "device_put":
            hold_once()
        return copy(page_data)

    if held_in == "transfer":
        wait_for_arrays = jax.block_until_ready

        def slow_transfer(x):  # the stager's wait for its rows to land
            if threading.current_thread().name.startswith("adapter-stage"):
                hold_once()
            return wait_for_arrays(x)

        monkeypatch.setattr(jax, "block_until_ready", slow_transfer)

    greedy = SamplingParams(max_tokens=6, **GREEDY_KW)
    prompts = [rng.integers(3, llm.config.vocab_size, 9).tolist() for _ in range(3)]
    busy = engine.add_request(prompts[0], SamplingParams(max_tokens=100, **GREEDY_KW), None)  # outlasts the copy
    engine.step()
    runner.adapter_rows = slow_copy
    try:
        waiting = engine.add_request(prompts[1], greedy, "slow_copy")
        behind = engine.add_request(prompts[2], greedy, None)
        deadline = time.monotonic() + 60
        while not (behind.generated and held) and time.monotonic() < deadline:
            engine.step()  # blocks (until the 60-s release) if it waits for the held copy
            time.sleep(0.01)
        assert not release.is_set() and held, "the copy was not started, or a step waited for it"
        assert behind.generated, "the request behind the copy did not start"
        assert waiting.batch_slot is None and waiting.num_computed == 0  # still waiting on its copy
        release.set()
        outputs = run_until_done(engine, [busy, waiting, behind])
    finally:
        release.set()
        del runner.adapter_rows
    reference = llm.generate_reference(prompts[1:], ["slow_copy", None], greedy)
    assert outputs[waiting.request_id].token_ids == reference[0].token_ids
    assert outputs[behind.request_id].token_ids == reference[1].token_ids
    llm.remove_adapter("slow_copy")
