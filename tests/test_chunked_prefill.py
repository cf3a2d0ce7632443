"""Chunked prefill: decode rows and prompt chunks in one step, prompts split across steps by the
per-step row budget (max_num_batched_tokens), checked against transformers + peft token for token."""
from __future__ import annotations

import pytest
import torch

from jslora import LLM, SamplingParams
from jslora.memory import AdapterResidency, BlockAllocator
from jslora.request import Request, Status
from jslora.scheduler import Scheduler

from test_model_oracle import ADAPTERS, hf_peft

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def tiny_chunk_llm(ckpt, max_model_len: int = 128, **engine) -> LLM:
    """max_batch 8 and a budget of 32 rows: the decode rows take 16, so prompt chunks get 16 rows a step."""
    return LLM(str(ckpt["dir"]), {n: str(p) for n, p in ckpt["adapters"].items()}, dtype="float32",
               max_model_len=max_model_len,
               engine={**dict(max_batch=8, max_num_batched_tokens=32, num_pages=4096, kernels="pallas"), **engine})


@pytest.mark.parametrize("kind, engine", [("mha", {}), ("gqa", {}),
                                          # rope with the K/V write, each residual add with its norm
                                          ("mha", dict(fused_rope=True, fused_norm=True))],
                         ids=["mha", "gqa", "mha-fused"])
def test_tiny_chunks_match_peft_token_for_token(checkpoints, kind, engine, rng):
    """Every prompt is longer than a step's chunk room, so each one crosses several steps while the
    others decode beside it; mixed adapters and base rows equal HF + peft."""
    llm = tiny_chunk_llm(checkpoints[kind], **engine)
    assert all(getattr(llm.engine.runner.spec, option) for option in engine)
    check_against_peft(llm, checkpoints[kind], rng)


def test_packed_decode_tiles_match_peft_token_for_token(checkpoints, rng, monkeypatch):
    """The tiny MHA model's decode launches split their contexts (too few programs for a GPU), so they never
    pack heads; with one multiprocessor assumed they run unsplit, two KV heads packed into one query tile
    (pallas_kernels.decode_tiling.PACK_HEADS, the default for Llama-7B's decode), and still equal HF + peft."""
    from pallas_kernels import decode_tiling

    launches, plan = [], decode_tiling.decode_launch_params

    def one_sm_plan(*args, **kwargs):
        launches.append(plan(*args, **{**kwargs, "sms": 1}))
        return launches[-1]

    monkeypatch.setattr(decode_tiling, "decode_launch_params", one_sm_plan)
    llm = tiny_chunk_llm(checkpoints["mha"], max_model_len=112)  # a table width of its own: traced afresh
    check_against_peft(llm, checkpoints["mha"], rng)
    packed = [launch["pack_heads"] for launch in launches if launch["heads_per_program"] == 2]
    assert packed and all(packed)   # every launch of two heads a program packed them (batch-1 shapes take one)


def test_chunks_cut_to_fill_their_bucket_match_peft_token_for_token(checkpoints, rng):
    """Two requests at a time, steps compiled for 16, 32, 64 and 128 rows (EngineConfig.fit_chunks_from 32):
    prompts of 20-50 tokens admitted two at a time (as their adapters arrive): a step of two new prompts (64-112
    rows) or of a decode row and a prompt's rest launches the bucket below instead of padding up, its last
    chunk cut and finished in a later step. Tokens equal HF + peft."""
    llm = tiny_chunk_llm(checkpoints["gqa"], max_batch=2, max_num_batched_tokens=128, step_buckets=(16, 32, 64, 128),
                         fit_chunks_from=32)
    launched, run = [], llm.engine.runner.run
    llm.engine.runner.run = lambda batch, *a, **k: (launched.append(batch.num_rows), run(batch, *a, **k))[1]
    check_against_peft(llm, checkpoints["gqa"], rng, lengths=(40, 30, 45, 20, 30, 50))
    assert llm.engine.scheduler.num_fitted_steps >= 2, launched


def check_against_peft(llm, ckpt, rng, lengths=None):
    """Six prompts of 17-69 tokens (or these lengths), mixed adapters and base rows, greedy: every token
    equals HF + peft's."""
    ref_model = hf_peft(ckpt, ADAPTERS)
    row_adapters = [ADAPTERS[0], ADAPTERS[1], None, ADAPTERS[2], ADAPTERS[3], ADAPTERS[0]]
    prompts = [rng.integers(3, llm.config.vocab_size, size=int(n)).tolist()
               for n in (lengths or rng.integers(17, 70, size=len(row_adapters)))]
    outputs = llm.generate(prompts, adapter=row_adapters, sampling=GREEDY)
    stats = llm.engine.stats
    if lengths is None:  # a budget of 32 rows: chunks over many steps
        assert stats.prefill_steps >= sum(-(-len(p) // 16) for p in prompts) // 2, stats
    for prompt, name, out in zip(prompts, row_adapters, outputs):
        with torch.no_grad():
            ref = ref_model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name or "__base__"],
                                     max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist(), (name, len(prompt))


def test_a_long_prompt_never_stops_the_others_decoding(checkpoints, rng):
    """While a 100-token prompt is prefilled in 16-row chunks over 7 steps, the running request gets a
    token in every step: they share each step (one launch)."""
    llm = tiny_chunk_llm(checkpoints["gqa"])
    engine, vocab = llm.engine, llm.config.vocab_size
    short = engine.add_request(rng.integers(3, vocab, 5).tolist(), SamplingParams(max_tokens=40, temperature=0.0,
                                                                                  ignore_eos=True))
    while len(short.generated) < 2:
        engine.step()
    long = engine.add_request(rng.integers(3, vocab, 100).tolist(), GREEDY, ADAPTERS[1])
    per_step = []
    while not long.generated:
        before = len(short.generated)
        engine.step()
        per_step.append(len(short.generated) - before)
    assert len(per_step) >= 100 // 16, per_step
    assert all(n == 1 for n in per_step), per_step  # no step without a token for the short request
    while engine.has_unfinished():
        engine.step()
    alone = llm.generate([long.prompt_ids], ADAPTERS[1], GREEDY)[0]
    assert long.generated == alone.token_ids


def test_a_tenants_prompt_cut_across_steps_changes_nothing_for_another(checkpoints, rng):
    """A tenant's 90-token prompt arrives while another's request decodes, with steps of 16-128 rows and chunks
    cut to fit them from 32 rows: the prompt is cut (it crosses several steps), the other request still gets a
    token every step, and its tokens equal those it gets alone."""
    llm = tiny_chunk_llm(checkpoints["gqa"], max_num_batched_tokens=128, step_buckets=(16, 32, 64, 128),
                         fit_chunks_from=32)
    engine, vocab = llm.engine, llm.config.vocab_size
    victim_prompt = rng.integers(3, vocab, 5).tolist()
    sampling = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    victim = engine.add_request(victim_prompt, sampling)
    while len(victim.generated) < 2:
        engine.step()
    hostile = engine.add_request(rng.integers(3, vocab, 90).tolist(), GREEDY, ADAPTERS[1])  # 16 + 96 rows: cut to 64
    per_step = []
    while not hostile.generated:
        before = len(victim.generated)
        engine.step()
        per_step.append(len(victim.generated) - before)
    assert engine.scheduler.num_fitted_steps >= 1 and len(per_step) >= 2, per_step
    assert all(n == 1 for n in per_step), per_step
    while engine.has_unfinished():
        engine.step()
    assert victim.generated == llm.generate([victim_prompt], None, sampling)[0].token_ids


def _scheduler(budget: int, max_batch: int = 8, num_blocks: int = 512, **options) -> Scheduler:
    allocator = BlockAllocator(num_blocks, 16)
    return Scheduler(allocator, AdapterResidency(allocator, 4), max_batch=max_batch, max_num_batched_tokens=budget,
                     **options)


def _request(i: int, n: int) -> Request:
    return Request(f"r{i}", [1] * n, SamplingParams(max_tokens=4, ignore_eos=True), None, seed=0, arrival=float(i))


def test_the_budget_counts_decode_rows_and_chunks_come_in_whole_tiles():
    """Budget 64: with 3 decode rows (one tile) a 100-token prompt gets 48 rows now, the rest (52)
    over the next steps; a prompt admitted behind it waits for room; the last chunk may be ragged."""
    s = _scheduler(64)
    running = [_request(i, 10) for i in range(3)]
    for r in running:
        s.add(r)
    plan = s.schedule()
    assert [(c.request.request_id, c.start, c.length) for c in plan.chunks] == [("r0", 0, 10), ("r1", 0, 10),
                                                                                ("r2", 0, 10)]
    for c in plan.chunks:  # as the engine does after launching
        c.request.num_computed, c.request.pending = c.start + c.length, 1
        c.request.generated.append(7)
        c.request.pending = 0
    long, behind = _request(3, 100), _request(4, 30)
    s.add(long)
    s.add(behind)
    plan = s.schedule()
    assert len(plan.decode) == 3
    assert [(c.request.request_id, c.start, c.length) for c in plan.chunks] == [("r3", 0, 48)]
    assert behind.status is Status.WAITING  # no tile of room left
    long.num_computed = 48
    plan = s.schedule()
    assert [(c.request.request_id, c.start, c.length) for c in plan.chunks] == [("r3", 48, 48)]
    long.num_computed = 96
    plan = s.schedule()
    assert [(c.request.request_id, c.start, c.length, c.is_last) for c in plan.chunks] == [
        ("r3", 96, 4, True), ("r4", 0, 30, True)]  # 16 + 32 rows: the whole of r4 fits
    assert not any(r is long for r in plan.decode)  # still prefilling: no decode row yet


def test_step_batch_layout_decode_rows_then_tiles(checkpoints, rng):
    """The batch the step gets: decode rows first, each chunk from the next tile boundary, the chunk
    that ends a prompt sampled at its last row, the others not sampled at all."""
    from jslora.engine.batch import step_batch
    from jslora.request import Chunk

    ckpt = checkpoints["gqa"]
    llm = LLM(str(ckpt["dir"]), dtype="float32",
              max_model_len=128, engine=dict(max_batch=8, max_num_batched_tokens=128, num_pages=4096, kernels="pallas"))
    engine = llm.engine
    a, b, c = (engine.add_request(rng.integers(3, 100, n).tolist(), GREEDY) for n in (5, 40, 20))
    engine.step()  # all three prefilled in one step (tokens not read back yet: all_ids are the prompts)
    runner = engine.runner
    chunks = [Chunk(b, 0, 32), Chunk(c, 4, 16)]
    batch = step_batch([a], chunks, 64, runner.shapes(), engine.residency, with_prefill=True)
    assert batch.tokens.shape == (64,) and batch.sample_rows.shape == (8,)
    assert batch.token_slot[0] == a.batch_slot and (batch.token_slot[1:] == 8).all()
    assert batch.tokens[16:48].tolist() == b.all_ids[:32] and batch.tokens[48:64].tolist() == c.all_ids[4:20]
    assert batch.positions[48] == 4 and batch.prefill.tile_pos.tolist() == [0, 0, 16, 4]
    assert batch.prefill.tile_seq.tolist() == [2, 0, 0, 1] and batch.prefill.seq_lens[:2].tolist() == [32, 20]
    # a's decode row and c's chunk (which ends c's prompt) are sampled; b's is not
    assert batch.sample_rows[:2].tolist() == [0, 63] and batch.sample_slot[:2].tolist() == [a.batch_slot,
                                                                                           c.batch_slot]
    assert (batch.sample_slot[2:] == 8).all() and batch.decode.lens[:2].tolist() == [a.num_computed + 1, 0]


def _decoding(s: Scheduler, lengths: list[int]) -> list[Request]:
    """Requests admitted and prefilled in one step, now decoding."""
    running = [_request(i, n) for i, n in enumerate(lengths)]
    for r in running:
        s.add(r)
    for c in s.schedule().chunks:
        c.request.num_computed = c.start + c.length
        c.request.generated.append(7)
    return running


def _chunks(plan) -> list[tuple[str, int, int, bool]]:
    return [(c.request.request_id, c.start, c.length, c.is_last) for c in plan.chunks]


BUCKETS = (16, 32, 64, 128, 256)


def test_a_step_padded_up_to_its_bucket_launches_the_bucket_below_with_its_last_chunk_cut():
    """3 decode rows (a tile) + prompts of 50 and 70 tokens need 16 + 64 + 80 = 160 rows, which pad to 256:
    the last chunk gives 32 rows back (48 of its 70 tokens) so the step launches 128; the rest, 22 tokens,
    is the next step's, and only then is the request's first token sampled."""
    s = _scheduler(256, step_buckets=BUCKETS, fit_from=64)
    _decoding(s, [5, 5, 5])
    s.add(_request(3, 50))
    s.add(late := _request(4, 70))
    plan = s.schedule()
    assert _chunks(plan) == [("r3", 0, 50, True), ("r4", 0, 48, False)]
    assert s.num_fitted_steps == 1
    late.num_computed = 48
    plan.chunks[0].request.num_computed = 50
    assert ("r4", 48, 22, True) in _chunks(s.schedule())


@pytest.mark.parametrize("fit_from, lengths, expect", [
    (192, (50, 70), [("r3", 0, 50, True), ("r4", 0, 70, True)]),   # the bucket below (128) is under fit_from
    (64, (100, 10), [("r3", 0, 100, True), ("r4", 0, 10, True)]),  # 144 rows: the last chunk has no tile to give
    (64, (50, 60), [("r3", 0, 50, True), ("r4", 0, 60, True)]),    # 16 + 64 + 64: 144 -> 256, floor 128 needs 16
], ids=["under-fit-from", "last-chunk-too-short", "cut-by-a-tile"])
def test_a_step_is_cut_only_where_the_bucket_below_is_large_enough_and_the_last_chunk_keeps_a_tile(
        fit_from, lengths, expect):
    s = _scheduler(256, step_buckets=BUCKETS, fit_from=fit_from)
    _decoding(s, [5, 5, 5])
    for i, n in enumerate(lengths, 3):
        s.add(_request(i, n))
    got = _chunks(s.schedule())
    if lengths == (50, 60):  # 16 + 64 + 64 = 144 rows: 16 over 128, so 60 tokens (64 rows) keep 48
        expect = [("r3", 0, 50, True), ("r4", 0, 48, False)]
    assert got == expect


def test_a_cut_chunk_registers_only_the_blocks_it_computes_and_is_not_cut_once_shared():
    """With a prefix cache the cut chunk's request registers the full blocks of its 128 tokens (8), not of
    its 150 (9): no later request may match a block nobody wrote. A request behind it whose prompt goes on
    into the chunk's blocks (here one too long for the pool) makes it register them whole first, so that
    chunk is not cut; a request with another prompt leaves it to be cut."""
    from jslora.memory import PrefixCache

    def plan_for(*prompts):
        allocator = BlockAllocator(64, 16)
        s = Scheduler(allocator, AdapterResidency(allocator, 4), max_batch=8, max_num_batched_tokens=256,
                      prefix_cache=PrefixCache(allocator), step_buckets=BUCKETS, fit_from=64)
        requests = [Request(f"r{i}", ids, SamplingParams(max_tokens=4), None, seed=0, arrival=float(i))
                    for i, ids in enumerate(prompts)]
        for r in requests:
            s.add(r)
        return s.schedule(), requests

    prompt = list(range(3, 153))
    plan, (alone,) = plan_for(prompt)  # 160 rows pad to 256: cut to 128
    assert _chunks(plan) == [("r0", 0, 128, False)] and alone.cache_chain[0] == 128 // 16
    plan, (first, other) = plan_for(prompt, [7] * 1000)  # another prompt, too long: tried, not admitted
    assert _chunks(plan) == [("r0", 0, 128, False)] and other.status is Status.WAITING
    plan, (first, sharing) = plan_for(prompt, prompt[:100] + [7] * 1000)  # shares 6 blocks, too long
    assert _chunks(plan) == [("r0", 0, 150, True)] and first.cache_chain[0] == 150 // 16
    assert sharing.status is Status.WAITING


def test_under_the_h100_step_model_fitting_s1s_steps_cuts_padding_and_serves_more(tmp_path):
    """benchmarks/bucket_fit_sim.py: S1 (10 s) under the simulator with a step-cost model fitted to an H100's
    steps. Cutting chunks to fit their bucket (from 256 rows) launches fewer padding rows and finishes the
    same requests sooner (a model's estimate, the measurement is the GPU's: benchmarks/RESULTS.md)."""
    from benchmarks import bucket_fit_sim

    off, fit = bucket_fit_sim.main(["--duration", "10", "--seeds", "7", "--out", str(tmp_path)])
    assert off["fit_from"] is None and fit["fit_from"] == 256
    assert off["finished"] == fit["finished"] == off["requests"]
    assert fit["padding_share"] < off["padding_share"] - 0.02, (off, fit)
    assert fit["req_s"] > off["req_s"], (off, fit)
    # the LoRA kernels' cost per distinct adapter (jslora rather than base-only) slows the same schedule
    _, with_lora = bucket_fit_sim.main(["--duration", "10", "--seeds", "7", "--adapter-rows-us", "12.8",
                                        "--out", str(tmp_path)])
    assert with_lora["finished"] == fit["finished"] and with_lora["req_s"] < fit["req_s"], (fit, with_lora)
