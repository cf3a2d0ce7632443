"""Prefix caching keyed by adapter version: the cache and the scheduler on their own, then the engine
(the plain-jnp kernels backend, JSLORA_KERNELS in conftest) against the plain reference model token for token, for mixed
adapters, after an adapter is replaced under its name, under evictions, and when a launch fails."""
from __future__ import annotations

import pytest

from jslora import LLM, SamplingParams
from jslora.engine import EngineConfig
from jslora.memory import AdapterResidency, BlockAllocator, PrefixCache
from jslora.request import Request
from jslora.scheduler import Scheduler
from jslora.scheduler.simulator import SimAdapter

from serving import run_until_done

BS = 16
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


# -- the cache and the scheduler, on the host only ---------------------------------------------------
class Pool:
    """A scheduler over a small unified pool with a prefix cache, stepped by hand (tokens made up)."""

    def __init__(self, num_blocks: int = 64, budget: int = 256, max_batch: int = 8):
        self.allocator = BlockAllocator(num_blocks, BS)
        self.residency = AdapterResidency(self.allocator, 4)
        self.cache = PrefixCache(self.allocator)
        self.residency.caches.append(self.cache)
        self.scheduler = Scheduler(self.allocator, self.residency, max_batch=max_batch,
                                   max_num_batched_tokens=budget, load_adapter=self._load, prefix_cache=self.cache)
        self._ids = 0

    def _load(self, request, extra_blocks):
        need = self.residency.blocks_for_pages(request.adapter.num_pages) + extra_blocks
        if not self.residency.make_room(need, need_slot=True):
            return False
        self.residency.install(request.adapter.uid, {}, request.adapter.num_pages)
        return True

    def add(self, prompt, adapter=None, max_tokens=3, cache_salt=None, **sampling) -> Request:
        self._ids += 1
        request = Request(f"r{self._ids}", list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                         **sampling),
                          adapter, seed=0, arrival=float(self._ids), cache_salt=cache_salt)
        self.scheduler.add(request)
        return request

    def step(self):
        """Plan a step and do what the engine does after launching it (each sampled token is 7)."""
        plan = self.scheduler.schedule()
        for r in plan.decode:
            r.num_computed += 1
            r.generated.append(7)
        for c in plan.chunks:
            c.request.num_computed = c.start + c.length
            if c.is_last:
                c.request.generated.append(7)
        for r in plan.decode + [c.request for c in plan.chunks if c.is_last]:
            if len(r.generated) >= r.sampling.max_tokens:
                self.scheduler.finish(r)
        return plan

    def run(self):
        while self.scheduler.has_work():
            self.step()


def tokens(rng, n):
    return rng.integers(3, 1000, n).tolist()


def test_a_later_request_shares_the_cached_blocks_of_its_prefix(rng):
    pool = Pool()
    prefix = tokens(rng, 40)
    first = pool.add(prefix + tokens(rng, 10))
    pool.run()
    assert pool.cache.num_cached_blocks == (50 + 2) // BS  # full blocks of prompt and output
    second = pool.add(prefix + tokens(rng, 5))
    plan = pool.step()
    assert [(c.request, c.start) for c in plan.chunks] == [(second, 32)]  # two whole blocks cached
    assert second.cached_tokens == 32 and pool.cache.hit_tokens == 32
    assert second.k_blocks[:2] == [e.k_block for e in pool.cache.match(0, prefix, 40)]
    assert first.k_blocks == []  # finished: its blocks belong to the cache now
    # the last token is always computed (its logits are sampled): an identical prompt of 2 blocks hits 1
    same = pool.add(second.prompt_ids[:32])
    pool.step()
    assert same.cached_tokens == 16


def test_keys_are_chains_per_adapter_version_and_penalties_opt_out(rng):
    pool = Pool()
    a1, a2 = SimAdapter("a", 1, 16), SimAdapter("a", 2, 16)  # a replaced under its name: a new uid
    prefix = tokens(rng, 48)
    pool.add(prefix + [5], adapter=a1)
    pool.run()
    assert pool.add(prefix + [6], adapter=a2) and pool.step().chunks[0].start == 0  # another version: a miss
    assert pool.add(prefix + [6]) and pool.step().chunks[0].start == 0  # the base model: a miss
    assert pool.add(prefix + [6], adapter=a1) and pool.step().chunks[0].start == 48
    # same second block after a different first one: the chain key misses
    assert pool.add(tokens(rng, 16) + prefix[16:] + [6], adapter=a1) and pool.step().chunks[0].start == 0
    # sampling that reads the prompt's tokens (penalties) computes them all
    assert pool.add(prefix + [6], adapter=a1, repetition_penalty=1.2) and pool.step().chunks[0].start == 0
    # a salted request (vLLM's cache_salt) shares only with requests of its own salt
    assert pool.add(prefix + [6], adapter=a1, cache_salt="t1") and pool.step().chunks[0].start == 0
    pool.run()
    assert pool.add(prefix + [7], adapter=a1, cache_salt="t1") and pool.step().chunks[0].start == 48
    assert pool.add(prefix + [7], adapter=a1, cache_salt="t2") and pool.step().chunks[0].start == 0
    pool.run()
    pool.cache.drop_adapter(1)  # salted or not, the version's blocks are gone
    assert pool.cache.match(1, prefix, 48) == [] and pool.cache.match((1, "t1"), prefix, 48) == []
    assert pool.cache.match(0, prefix, 48)


def test_requests_admitted_in_one_step_share_the_blocks_being_computed(rng):
    pool = Pool()
    prompt = tokens(rng, 40)
    first, second, third = pool.add(prompt), pool.add(prompt), pool.add(prompt[:20] + tokens(rng, 20))
    plan = pool.step()
    assert [(c.request, c.start, c.length) for c in plan.chunks] == [(first, 0, 40), (second, 32, 8),
                                                                    (third, 16, 24)]
    assert second.k_blocks[:2] == first.k_blocks[:2] and third.k_blocks[0] == first.k_blocks[0]
    pool.run()
    # every block returned: all idle in the cache or free
    assert pool.allocator.num_free + pool.cache.reclaimable_blocks == pool.allocator.capacity


def test_failed_computation_kills_the_fresh_blocks():
    pool = Pool()
    prompt = list(range(3, 43))
    first, second = pool.add(prompt), pool.add(prompt)
    pool.scheduler.schedule()  # planned, never computed: first's launch failed
    killed = pool.cache.kill_fresh(first)
    assert killed == set(first.k_blocks[:2]) and not killed.isdisjoint(second.k_blocks)
    assert pool.cache.match(0, prompt, 39) == []
    pool.scheduler.finish(first)
    pool.scheduler.preempt(second)  # as the engine does with a request that read them
    assert pool.allocator.num_free == pool.allocator.capacity  # the dead blocks went back with the last holder
    plan = pool.step()
    assert plan.chunks[0].request is second and plan.chunks[0].start == 0


def test_cached_blocks_and_idle_adapters_are_evicted_oldest_first_before_any_preemption(rng):
    """A pool of 31 blocks: an idle adapter (2 blocks), then 3 finished requests' cached blocks; a
    long request needs almost the whole pool, so the adapter (used longest ago) and the older cached
    blocks go, the newest stay, and nobody is preempted."""
    pool = Pool(num_blocks=32, budget=512)
    adapter = SimAdapter("a", 1, 2 * BS)
    pool.add(tokens(rng, 10), adapter=adapter)
    pool.run()
    olds = [tokens(rng, 33) for _ in range(3)]
    for prompt in olds:  # one at a time: their blocks are cached in this order
        pool.add(prompt, max_tokens=1)
        pool.run()
    assert pool.residency.get(1) is not None and pool.cache.reclaimable_blocks == 3 * 2 * 2
    assert pool.allocator.num_free == 31 - 2 - 12 + 0
    running = pool.add(tokens(rng, 20), max_tokens=60)  # grows into the pool while the long one waits
    pool.step()
    long = pool.add(tokens(rng, 150), max_tokens=2)  # 10 K + 10 V blocks
    pool.step()
    assert long.num_computed == 150 and running.status.value == "running"
    assert pool.residency.evictions == 1 and pool.residency.get(1) is None  # the oldest: the adapter
    assert pool.cache.match(0, olds[0], 32) == [] and pool.cache.match(0, olds[2], 32)  # oldest went first
    pool.run()  # running grows to 80 tokens: more cached blocks go, still no preemption
    assert pool.scheduler.num_preemptions == 0 and pool.cache.evictions >= 4


# -- the engine against the reference model ----------------------------------------------------------
@pytest.fixture(scope="module")
def llm(checkpoints):
    """The GQA checkpoint with its PEFT adapters; small chunks (so prompts cross steps and requests
    admitted together share blocks still being computed) and a pool of 120 blocks."""
    ck = checkpoints["gqa"]
    engine = EngineConfig(max_batch=8, max_model_len=128, max_num_batched_tokens=48, num_pages=121 * 16,
                          max_lora_rank=16, max_adapters=4, watermark=0.0)
    return LLM(str(ck["dir"]), {n: str(p) for n, p in ck["adapters"].items()}, dtype="float32", engine=engine)


def test_outputs_with_the_cache_equal_the_reference_for_mixed_adapters(llm, rng):
    """Two prefixes under the base model and two adapters. First wave: two requests on one prefix
    admitted together (the second shares blocks the first is computing), and one prefix under two
    adapters (no sharing). Second wave: the same (prefix, adapter) pairs hit, a new pair misses."""
    engine = llm.engine
    engine.reset_prefix_cache()
    vocab = llm.config.vocab_size
    p0, p1 = (rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(33, 60, 2))
    suffix = lambda: rng.integers(3, vocab, int(rng.integers(1, 12))).tolist()  # noqa: E731
    a, b = llm.adapters[0], llm.adapters[1]
    waves = [[(p0, None), (p0, None), (p1, a), (p1, b)], [(p0, None), (p1, a), (p1, b), (p0, a)]]
    hit_blocks = [[0, len(p0) // 16, 0, 0], [len(p0) // 16, len(p1) // 16, len(p1) // 16, 0]]
    cache = engine.prefix_cache
    hit0, queried0, prompt_tokens = cache.hit_tokens, cache.queried_tokens, 0
    for wave, blocks in zip(waves, hit_blocks):
        prompts, adapters = [p + suffix() for p, _ in wave], [name for _, name in wave]
        prompt_tokens += sum(map(len, prompts))
        requests = [engine.add_request(p, GREEDY, name) for p, name in zip(prompts, adapters)]
        outputs = run_until_done(engine, requests)
        reference = llm.generate_reference(prompts, adapters, GREEDY)
        assert [outputs[r.request_id].token_ids for r in requests] == [o.token_ids for o in reference]
        assert [r.cached_tokens for r in requests] == [16 * n for n in blocks]
    # the hit rate counts exactly these hits over these prompts (the module's engine carries other tests' counts;
    # a fixed threshold on the total failed at seed 1374617566 with every hit above as expected)
    assert (cache.hit_tokens - hit0, cache.queried_tokens - queried0) == (16 * sum(map(sum, hit_blocks)),
                                                                          prompt_tokens)
    stats = engine.memory_stats()
    assert stats["kv_blocks"] == 0 and stats["prefix_cache_hit_rate"] == cache.hit_rate() > 0, stats


def test_a_replaced_adapter_never_gets_its_old_versions_blocks(llm, checkpoints, rng):
    ck = checkpoints["gqa"]["adapters"]
    engine = llm.engine
    prompt = rng.integers(3, llm.config.vocab_size, 60).tolist()
    llm.add_adapter("tenant", str(ck["r4_qv"]))
    old = llm.generate([prompt], "tenant", GREEDY)[0].token_ids
    assert old == llm.generate_reference([prompt], "r4_qv", GREEDY)[0].token_ids
    llm.add_adapter("tenant", str(ck["r8_all_rslora"]))  # the same name, other weights
    hits = engine.prefix_cache.hit_tokens
    new = llm.generate([prompt], "tenant", GREEDY)[0].token_ids
    assert engine.prefix_cache.hit_tokens == hits  # nothing of the old version was served
    assert new == llm.generate_reference([prompt], "r8_all_rslora", GREEDY)[0].token_ids
    again = llm.generate([prompt], "tenant", GREEDY)[0].token_ids  # the new version's own blocks hit
    assert again == new and engine.prefix_cache.hit_tokens > hits
    llm.remove_adapter("tenant")


def test_evicted_prefixes_are_recomputed_and_outputs_stay_exact(llm, rng):
    """Far more prefixes than the pool holds: cached blocks are evicted (and adapters with them), and
    every request, hit or miss, still equals the reference."""
    engine = llm.engine
    evictions = engine.prefix_cache.evictions
    vocab = llm.config.vocab_size
    prefixes = [rng.integers(3, vocab, 80).tolist() for _ in range(12)]  # 12 x 10 cached blocks > the pool
    names = [None, *llm.adapters]
    prompts = [prefixes[i % 12] + rng.integers(3, vocab, 4).tolist() for i in range(30)]
    adapters = [names[i % len(names)] for i in range(30)]
    reference = [o.token_ids for o in llm.generate_reference(prompts, adapters, GREEDY)]
    outputs = []
    for start in range(0, 30, 5):  # in waves, so that later waves find (or miss) earlier ones' blocks
        outputs += [o.token_ids for o in llm.generate(prompts[start:start + 5], adapters[start:start + 5], GREEDY)]
    assert outputs == reference
    assert engine.prefix_cache.evictions > evictions
    assert engine.memory_stats()["kv_blocks"] == 0


def test_a_failed_launch_sends_the_requests_sharing_its_blocks_back_to_be_recomputed(llm, rng):
    engine = llm.engine
    engine.reset_prefix_cache()
    prompt = rng.integers(3, llm.config.vocab_size, 20).tolist()  # 32 rows: the 2nd's rest fits the step too
    expected = llm.generate_reference([prompt], None, GREEDY)[0].token_ids
    bad = SamplingParams(max_tokens=5)
    object.__setattr__(bad, "top_k", 2**40)  # past validation (a bug, say): its metadata cannot be built
    failing = engine.add_request(prompt, bad)  # admitted first: it registers the prompt's blocks
    sharing = engine.add_request(prompt, GREEDY)  # admitted in the same step, on those blocks
    preemptions = engine.scheduler.num_preemptions
    outputs = run_until_done(engine, [failing, sharing])
    assert outputs[failing.request_id].error_status == 500
    assert sharing.num_preemptions == 1 and engine.scheduler.num_preemptions == preemptions + 1
    assert outputs[sharing.request_id].token_ids == expected
    assert engine.memory_stats()["kv_blocks"] == 0


def test_without_the_cache_nothing_is_kept(checkpoints, rng):
    ck = checkpoints["mha"]
    llm = LLM(str(ck["dir"]), dtype="float32",
              engine=dict(max_batch=4, max_model_len=64, num_pages=40 * 16, enable_prefix_caching=False))
    start = llm.engine.allocator.num_free
    prompt = rng.integers(3, llm.config.vocab_size, 40).tolist()
    outs = llm.generate([prompt, prompt], None, GREEDY)
    assert outs[0].token_ids == outs[1].token_ids == llm.generate_reference([prompt], None, GREEDY)[0].token_ids
    assert llm.engine.prefix_cache is None and "prefix_cache_blocks" not in llm.engine.memory_stats()
    assert llm.engine.allocator.num_free == start
