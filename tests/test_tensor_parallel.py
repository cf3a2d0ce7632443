"""Tensor parallelism on CPU devices (conftest asks XLA for 4): the shard_map'd engine steps give the
1-device engine's tokens, and each layer communicates exactly what the Megatron partition needs."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jslora import LLM, SamplingParams


@pytest.fixture(autouse=True)
def _pallas_on_one_device_too(monkeypatch):
    """Under tensor parallelism LoRA runs on the Pallas kernels: the one-device engines these tests compare
    against run on them too (not on conftest's reference default)."""
    monkeypatch.setenv("JSLORA_KERNELS", "pallas")


def engine_llm(checkpoints, kind: str, tp: int, **engine) -> LLM:
    return LLM(str(checkpoints[kind]["dir"]), dtype="float32", max_model_len=128,
               engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=tp, **engine))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, 200, int(n)).tolist() for n in (5, 17, 33, 9, 2)]


@pytest.mark.parametrize("kind,tp", [("mha", 2), ("mha", 4), ("gqa", 2), ("qwen2", 2)])
def test_tokens_equal_the_single_device_engine(checkpoints, prompts, kind, tp):
    """Greedy and seeded-sampled tokens (which follow the logits' whole distribution) of a
    tensor-parallel engine equal one device's, f32."""
    assert len(jax.devices()) >= tp
    one, many = engine_llm(checkpoints, kind, 1), engine_llm(checkpoints, kind, tp)
    for sampling in (SamplingParams(max_tokens=12, temperature=0.0),
                     SamplingParams(max_tokens=12, temperature=1.0, seed=7)):
        want = [o.token_ids for o in one.generate(prompts, sampling=sampling)]
        got = [o.token_ids for o in many.generate(prompts, sampling=sampling)]
        assert got == want
    pool = many.engine.runner.pool
    assert pool.sharding.shard_shape(pool.shape)[1] == pool.shape[1] // tp


@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_fused_kernels_under_tensor_parallelism(checkpoints, prompts, kind):
    """Rope and the K/V write in one kernel (fused_rope) on each device's heads and pool shard, and each
    residual add (of the all-reduced o and down outputs, q, k, v biases on qwen2) with its RMSNorm
    (fused_norm) on each device's replica of the rows: one device's tokens on the default path."""
    one, many = engine_llm(checkpoints, kind, 1), engine_llm(checkpoints, kind, 2, fused_rope=True, fused_norm=True)
    sampling = SamplingParams(max_tokens=12, temperature=0.0)
    assert ([o.token_ids for o in many.generate(prompts, sampling=sampling)]
            == [o.token_ids for o in one.generate(prompts, sampling=sampling)])


@pytest.mark.parametrize("kind,tp", [("mha", 4), ("gqa", 2)])
def test_logits_equal_the_single_device_engine(checkpoints, prompts, kind, tp):
    """The decode step's logits for running requests with adapters and base rows mixed, after their
    prefill: tensor-parallel equals one device to f32 rounding."""
    from jslora.model.paged import step_logits

    adapters = {name: str(path) for name, path in checkpoints[kind]["adapters"].items()}
    names = [None] + list(adapters)
    logits = []
    for n in (1, tp):
        llm = LLM(str(checkpoints[kind]["dir"]), adapters, dtype="float32", max_model_len=128, max_lora_rank=16,
                  engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=n))
        engine = llm.engine
        # every adapter in the pool first: a request whose adapter is still being copied to the device waits
        # a step or more, as long as the copy takes, so admission would follow the copies' timing
        llm.generate([[5, 6, 7]] * len(adapters), list(adapters), SamplingParams(max_tokens=1))
        requests = [engine.add_request(p, SamplingParams(max_tokens=4, temperature=0.0), names[i % len(names)])
                    for i, p in enumerate(prompts)]
        while not all(r.generated for r in requests):
            engine.step()
        running = sorted((r for r in requests if r.batch_slot is not None), key=lambda r: r.request_id)
        runner = engine.runner
        batch = runner.step_batch(running, [], engine.residency)
        logits.append(np.asarray(step_logits(runner.params, runner.spec, runner.pool, runner.slot_state, batch)))
    one, many = logits
    assert np.abs(one).max() > 0.1
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(kind, result shape) of every cross-device collective in compiled HLO text."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                      r"(-start)?\(", line)
        if m:
            found.append((m.group(2), m.group(1)))
    return found


@pytest.mark.parametrize("tp", [2, 4])
def test_each_layer_all_reduces_twice_and_nothing_else(checkpoints, tp):
    """Base model: the o and down outputs ([tokens, H] f32 partial sums) are all-reduced, once each
    per layer; no all-gathers (the LM head is replicated)."""
    from jslora.engine.batch import step_batch
    from jslora.model.packing import pack_batch
    from jslora.model.paged import jitted_step

    llm = engine_llm(checkpoints, "mha", tp)
    engine, cfg = llm.engine, llm.config
    runner = engine.runner
    batch = runner.decode_buckets[1]
    meta = step_batch([], [], batch, runner.shapes(), engine.residency, with_prefill=False)
    hlo = jitted_step(meta.num_rows).lower(runner.params, runner.spec, runner.pool, runner.slot_state,
                                           *pack_batch(meta), filtered=False).compile().as_text()
    found = collectives(hlo)
    assert [kind for kind, _ in found] == ["all-reduce"] * (2 * cfg.num_layers), found
    assert all(shape.startswith("f32[") and shape.split("{")[0].endswith(f"[{batch},{cfg.hidden_size}]")
               or shape.split("{")[0] == f"f32[1,{batch},{cfg.hidden_size}]" for _, shape in found), found


def test_bad_tensor_parallel_sizes_are_clear_errors(checkpoints):
    with pytest.raises(ValueError, match="must divide num_key_value_heads"):
        engine_llm(checkpoints, "gqa", 4)
    with pytest.raises(ValueError, match="needs 8 devices"):
        engine_llm(checkpoints, "mha", 8)


@pytest.mark.parametrize("kind,tp", [("mha", 2), ("mha", 4), ("gqa", 2)])
def test_lora_under_tensor_parallelism_equals_one_device(checkpoints, prompts, kind, tp):
    """PEFT adapters on every target (ranks 2-16, patterns) and base-model rows mixed in one batch:
    the tensor-parallel engine's tokens equal one device's."""
    adapters = {name: str(path) for name, path in checkpoints[kind]["adapters"].items()}
    names = [None] + list(adapters)

    def llm(n):
        return LLM(str(checkpoints[kind]["dir"]), adapters, dtype="float32", max_model_len=128, max_lora_rank=16,
                   engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=n))

    which = [names[i % len(names)] for i in range(len(prompts))]
    sampling = SamplingParams(max_tokens=10, temperature=0.0)
    one, many = llm(1), llm(tp)
    want = [o.token_ids for o in one.generate(prompts, which, sampling)]
    got = [o.token_ids for o in many.generate(prompts, which, sampling)]
    assert got == want
    assert want == [o.token_ids for o in one.generate_reference(prompts, which, sampling)]


@pytest.mark.parametrize("tp", [2, 4])
def test_lora_adds_only_tokens_by_rank_all_gathers(checkpoints, tp):
    """With LoRA on all 7 targets a layer still all-reduces twice ([tokens, H]); LoRA adds one
    all-gather per column-parallel group (q,k,v and gate,up) of [tokens, targets, max rank], and the
    row-parallel targets (o, down) add nothing: their partial sums ride on the base all-reduces."""
    from jslora.engine.batch import step_batch
    from jslora.model.packing import pack_batch
    from jslora.model.paged import jitted_step

    adapters = {name: str(path) for name, path in checkpoints["mha"]["adapters"].items()}
    llm = LLM(str(checkpoints["mha"]["dir"]), adapters, dtype="float32", max_model_len=128, max_lora_rank=16,
              engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=tp))
    engine, cfg = llm.engine, llm.config
    engine.step()  # apply the registrations: the step now carries LoRA on every target
    assert set(engine.runner.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
    runner = engine.runner
    batch, rank = runner.decode_buckets[1], engine.max_lora_rank
    meta = step_batch([], [], batch, runner.shapes(), engine.residency, with_prefill=False)
    hlo = jitted_step(meta.num_rows).lower(runner.params, runner.spec, runner.pool, runner.slot_state,
                                           *pack_batch(meta), filtered=False).compile().as_text()
    found = collectives(hlo)
    reduces = [s for k, s in found if k == "all-reduce"]
    gathers = [s.split("{")[0] for k, s in found if k == "all-gather"]
    assert len(reduces) == 2 * cfg.num_layers and len(found) == 4 * cfg.num_layers, found
    assert sorted(gathers) == sorted([f"f32[{batch},3,{rank}]", f"f32[{batch},2,{rank}]"] * cfg.num_layers), gathers

    # the cost study's variant (S-LoRA's "without LoRA communication") drops exactly those gathers
    import dataclasses

    from jslora.bench.baselines import WITHOUT_LORA_COMMUNICATION

    spec = dataclasses.replace(runner.spec, backend=WITHOUT_LORA_COMMUNICATION)
    hlo = jitted_step(meta.num_rows).lower(runner.params, spec, runner.pool, runner.slot_state,
                                           *pack_batch(meta), filtered=False).compile().as_text()
    assert [k for k, _ in collectives(hlo)] == ["all-reduce"] * (2 * cfg.num_layers)

    # a step with prompt chunks: the chunks' tiles carry their own gather beside the decode rows'
    rows = runner.step_buckets[2]
    meta = step_batch([], [], rows, runner.shapes(), engine.residency, with_prefill=True)
    hlo = jitted_step(meta.num_rows).lower(runner.params, runner.spec, runner.pool, runner.slot_state,
                                           *pack_batch(meta), filtered=False).compile().as_text()
    gathers = [s.split("{")[0] for k, s in collectives(hlo) if k == "all-gather"]
    decode_rows = min(rows, 8)
    assert sorted(gathers) == sorted([f"f32[{decode_rows},3,{rank}]", f"f32[{decode_rows},2,{rank}]",
                                      f"f32[{rows},3,{rank}]", f"f32[{rows},2,{rank}]"] * cfg.num_layers), gathers


def test_orbax_checkpoint_restores_straight_onto_the_mesh(checkpoints, prompts, tmp_path):
    """`jslora convert` writes an orbax checkpoint once; an LLM on it restores each weight already
    split over the mesh (no full copy first) and generates what the HF directory does."""
    from jslora.cli import main
    from jslora.loading.checkpoint import load_hf_params
    from jslora.parallel import param_specs

    out = tmp_path / "converted"
    main(["convert", "--model", str(checkpoints["mha"]["dir"]), "--out", str(out), "--dtype", "float32"])
    llm = LLM(str(out), dtype="float32", max_model_len=128,
              engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=2))
    specs = param_specs(llm.params, llm.config)
    from jax.sharding import PartitionSpec

    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    assert len(spec_leaves) == len(jax.tree.leaves(llm.params))
    for array, spec in zip(jax.tree.leaves(llm.params), spec_leaves):
        assert array.sharding.spec == spec and len(array.sharding.device_set) == 2
    hf = load_hf_params(checkpoints["mha"]["dir"], llm.config, "float32")
    # q, k, v fused in two groups: device g holds its own columns of each (fuse_projections)
    q, k, v = (np.asarray(hf["layers"][n][1]) for n in ("q", "k", "v"))
    qkv = llm.params["layers"][1]["qkv"]
    for g, shard in enumerate(sorted(qkv.addressable_shards, key=lambda s: s.index[1].start)):
        want = np.concatenate([w.reshape(w.shape[0], 2, -1)[:, g] for w in (q, k, v)], axis=-1)
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], want)
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    want = [o.token_ids for o in engine_llm(checkpoints, "mha", 1).generate(prompts, sampling=sampling)]
    assert [o.token_ids for o in llm.generate(prompts, sampling=sampling)] == want


def test_two_processes_run_one_tensor_parallel_engine(checkpoints, tmp_path):
    """Multi-host: two processes with 2 CPU devices each join through jax.distributed into a 4-device
    mesh and run a TP=4 engine; both get the 1-device engine's tokens."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_dir = str(checkpoints["mha"]["dir"])
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), model_dir, str(tmp_path / f"{i}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    import json

    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    want = [o.token_ids for o in engine_llm(checkpoints, "mha", 1).generate(
        [[5, 9, 33, 2, 71], [100, 3, 3, 8]], sampling=SamplingParams(max_tokens=6, temperature=0.0))]
    assert results[0] == results[1] == want


@pytest.mark.parametrize("tp", [2, 4])
def test_dummy_weights_are_generated_straight_into_their_shards(tp):
    """`dummy:` weights under tensor parallelism (a Llama-70B does not fit one GPU before sharding): each
    layer made on the mesh with its Megatron split, the same values as on one device."""
    import dataclasses

    import jax.numpy as jnp

    from jslora.config import ModelConfig
    from jslora.loading.checkpoint import dummy_params
    from jslora.model.llama import unstack_layers
    from jslora.parallel import make_mesh

    cfg = ModelConfig.named("tiny")
    cfg = dataclasses.replace(cfg, num_kv_heads=4)  # 4 KV heads: splits 4 ways
    one = unstack_layers(dummy_params(cfg, seed=3, dtype=jnp.float32))
    sharded = dummy_params(cfg, seed=3, dtype=jnp.float32, mesh=make_mesh(tp))
    assert isinstance(sharded["layers"], list) and len(sharded["layers"]) == cfg.num_layers
    for name in ("embed", "final_norm", "lm_head"):
        np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(one[name]))
    for lp_one, lp in zip(one["layers"], sharded["layers"]):
        assert lp.keys() == lp_one.keys()
        for name in lp:
            np.testing.assert_array_equal(np.asarray(lp[name]), np.asarray(lp_one[name]))
        q, o = lp["q"], lp["o"]  # column-parallel split by output columns, row-parallel by input rows
        assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // tp)
        assert o.sharding.shard_shape(o.shape) == (o.shape[0] // tp, o.shape[1])


def test_fp8_kv_cache_under_tensor_parallelism(checkpoints, prompts):
    """An FP8 KV cache on each device's pool columns (each device packs its own KV heads' keys and values,
    rope fused into the write): one device's FP8 tokens, up to near-ties an FP8 rounding of a key moved by
    the split's accumulation order can flip (test_fp8.assert_same_greedy)."""
    from test_fp8 import GREEDY_TOP, assert_same_greedy

    one = engine_llm(checkpoints, "gqa", 1, kv_cache_dtype="fp8")
    many = engine_llm(checkpoints, "gqa", 2, kv_cache_dtype="fp8", fused_rope=True)
    assert_same_greedy(one.generate(prompts, sampling=GREEDY_TOP), many.generate(prompts, sampling=GREEDY_TOP))
