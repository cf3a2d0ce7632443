"""Public API: dummy models and adapters, sampling, stop conditions, bad arguments."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jslora import LLM, ModelConfig, SamplingParams
from jslora.config import slora_setting
from jslora.sampling import sample, sample_unfiltered


@pytest.fixture(scope="module")
def tiny():
    return LLM("dummy:tiny", {"a": "dummy:8", "b": "dummy:16:q,v,gate,down"}, dtype="float32")


@pytest.mark.parametrize("name", ["llama-7b", "llama-13b", "llama-30b", "llama-70b", "llama-3-8b", "tiny"])
def test_shipped_configs_load(name):
    cfg = ModelConfig.named(name)
    assert cfg.hidden_size % cfg.num_heads == 0 and cfg.num_heads % cfg.num_kv_heads == 0


def test_slora_settings():
    assert slora_setting("S2") == {"model": "llama-7b", "ranks": [64, 32, 16, 8]}
    with pytest.raises(ValueError):
        slora_setting("S9")


def test_generate_with_dummy_adapters(tiny):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = tiny.generate(["hello", "hello", "hello"], adapter=[None, "a", "b"], sampling=greedy)
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
    assert outs[0].token_ids != outs[1].token_ids and outs[1].token_ids != outs[2].token_ids
    # a request's tokens do not depend on its batch
    alone = tiny.generate("hello", adapter="b", sampling=greedy)[0]
    assert alone.token_ids == outs[2].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a = tiny.generate([[5, 6, 7]], adapter="a", sampling=sp)[0]
    b = tiny.generate([[9, 9], [5, 6, 7]], adapter=[None, "a"], sampling=[SamplingParams(seed=1), sp])[1]
    assert a.token_ids == b.token_ids


def test_stop_string_and_eos(tiny):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = tiny.generate("abc", sampling=greedy)[0]
    stop = full.text[3:5]
    assert stop
    cut = tiny.generate("abc", sampling=SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_sample_filters():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3
    greedy = np.asarray(jnp.argmax(logits, -1))
    ones = jnp.ones((4,), jnp.float32)
    steps = jnp.arange(4, dtype=jnp.int32)
    seeds = jnp.full((4,), 7, jnp.int32)
    top1 = sample(logits, ones, jnp.ones((4,), jnp.int32), ones, seeds, steps)
    assert (np.asarray(top1) == greedy).all()
    tiny_p = sample(logits, ones, jnp.zeros((4,), jnp.int32), ones * 1e-6, seeds, steps)
    assert (np.asarray(tiny_p) == greedy).all()
    # top-k 5: every draw among the 5 largest logits, and more than one of them drawn
    draws = np.stack([np.asarray(sample(logits, ones, jnp.full((4,), 5, jnp.int32), ones, seeds, steps + 10 * i))
                      for i in range(40)])
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    assert all(set(draws[:, r]) <= set(top5[r]) for r in range(4))
    assert all(len(set(draws[:, r])) > 1 for r in range(4))


def test_one_argmax_sampling_equals_categorical():
    """sample_unfiltered takes greedy and sampled rows from one argmax: the same tokens as an argmax for the
    greedy rows and jax.random.categorical (same key) for the others, -inf entries (filtered) included."""
    rows, vocab = 12, 3000
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    logits = jax.random.normal(k1, (rows, vocab)) * 4
    logits = jnp.where(jax.random.uniform(k2, (rows, vocab)) < 0.3, -jnp.inf, logits)
    temperature = jnp.asarray([0.0, 1e-7, 0.5, 2.0, 100.0, 1.0] * 2, jnp.float32)  # extremes a tenant may send
    seeds = jax.random.randint(k3, (rows,), 0, 2**31 - 1)
    ones = jnp.ones((rows,), jnp.float32)
    for step in (0, 1, 977):
        steps = jnp.full((rows,), step, jnp.int32)
        got = np.asarray(sample_unfiltered(logits, temperature, jnp.zeros((rows,), jnp.int32), ones, seeds, steps))
        for r in range(rows):
            if temperature[r] == 0:
                want = int(jnp.argmax(logits[r]))
            else:
                key = jax.random.fold_in(jax.random.PRNGKey(seeds[r]), step)
                want = int(jax.random.categorical(key, logits[r] / max(float(temperature[r]), 1e-6)))
            assert got[r] == want, (step, r)
            assert np.isfinite(logits[r, got[r]])


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                    dict(top_k=-2), dict(seed=-5), dict(stop=[""])])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_generate_arguments(tiny):
    with pytest.raises(KeyError, match="unknown adapter 'zzz'"):
        tiny.generate("x", adapter="zzz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate([[1, 2, 10**6]])
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        tiny.generate([[3] * 500], sampling=SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="one entry per prompt"):
        tiny.generate(["a", "b"], adapter=["a"])


def test_cli_generate_demo(capsys):
    from jslora.cli import main

    main(["generate", "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert "[base model]" in out and "[a]" in out and "[b]" in out


def test_sampling_params_accept_only_their_real_ranges():
    """Property: any value of any type for any field either gives SamplingParams within the ranges a step
    can run (int32 counts, finite floats) or a ValueError naming the field; never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from jslora.sampling import INT32_MAX

    values = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4)
              | st.lists(st.text(max_size=3), max_size=3))
    fields = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"]

    @settings(max_examples=400, deadline=None)
    @given(st.fixed_dictionaries({}, optional={f: values for f in fields}))
    def check(kwargs):
        try:
            sp = SamplingParams(**kwargs)
        except ValueError as e:
            assert any(f in str(e) for f in kwargs), (kwargs, e)
            return
        assert 1 <= sp.max_tokens <= INT32_MAX and 0 <= sp.top_k <= INT32_MAX
        assert 0 <= sp.temperature <= 100 and 0 < sp.top_p <= 1
        assert sp.seed is None or 0 <= sp.seed <= INT32_MAX
        assert isinstance(sp.ignore_eos, bool) and all(isinstance(s, str) and s for s in sp.stop)

    check()
