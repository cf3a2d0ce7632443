"""vLLM's extra endpoints (/tokenize, /detokenize, /version), its metric names, and the CLI's polish,
on an in-process app (no engine steps needed for most of it)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from jslora import LLM, SamplingParams, __version__


@pytest.fixture(scope="module")
def app_client():
    from fastapi.testclient import TestClient

    from jslora.server.app import create_app

    llm = LLM("dummy:tiny", {"a": "dummy:8"}, max_lora_rank=16, max_model_len=128,
              engine=dict(max_batch=4, num_pages=4096, max_num_batched_tokens=128))
    with TestClient(create_app(llm, model_name="tiny")) as client:
        yield client, llm


def test_tokenize_and_detokenize_round_trip(app_client):
    client, llm = app_client
    r = client.post("/tokenize", json={"model": "tiny", "prompt": "héllo wörld"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == llm.encode("héllo wörld") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == llm.max_model_len
    assert client.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]}).json() == {
        "prompt": "héllo wörld"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.chat_prompt_ids([{"role": "user", "content": "hi"}])
    for bad in ('{"model": "tiny"}', '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
                '{"prompt": "\\ud800"}', '{"prompt": 5}'):
        r = client.post("/tokenize", content=bad.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], (bad, r.text)
    r = client.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_version_and_vllm_metric_names(app_client):
    client, llm = app_client
    assert client.get("/version").json() == {"version": __version__}
    for _ in range(2):  # the second finds the first's prompt blocks in the prefix cache
        r = client.post("/v1/completions", json={"model": "a", "prompt": list(range(3, 40)), "max_tokens": 2})
        assert r.status_code == 200, r.text
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:lora_requests_info",
                 "vllm:prefix_cache_queries_total", "jslora_prefix_cache_blocks", "jslora_pool_pages_prefix_cache"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    hits = [line for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 32, hits
    before = llm.engine.prefix_cache.hit_tokens  # a salted request finds nothing of the unsalted ones
    r = client.post("/v1/completions", json={"model": "a", "prompt": list(range(3, 40)), "max_tokens": 2,
                                             "cache_salt": "tenant-7"})
    assert r.status_code == 200 and llm.engine.prefix_cache.hit_tokens == before, r.text
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in text
    assert 'max_lora="' in text


def test_n_choices_share_the_prompts_kv_pages(app_client):
    """n = 4 samples of one 70-token prompt: the prompt's 4 full blocks are computed once and shared by
    the other three choices (the prefix cache, within the same step), and the choices still differ."""
    client, llm = app_client
    engine = llm.engine
    engine.reset_prefix_cache()
    prompt = [(7 * i) % 200 + 3 for i in range(70)]
    computed, hits = engine.stats.prompt_tokens, engine.prefix_cache.hit_tokens
    r = client.post("/v1/completions", json={"model": "a", "prompt": prompt, "n": 4, "max_tokens": 6,
                                             "temperature": 1.0, "seed": 5})
    assert r.status_code == 200, r.text
    assert engine.prefix_cache.hit_tokens - hits == 3 * 64
    assert engine.stats.prompt_tokens - computed == 70 + 3 * 6  # once in full, then 6 tokens per choice
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(set(texts)) > 1
    want = llm.generate_reference([prompt], "a", SamplingParams(max_tokens=6, temperature=1.0, seed=7))[0].text
    assert texts[2] == want  # choice j samples from seed + j, on the shared pages


def test_context_length_error_names_max_tokens(app_client):
    client, llm = app_client
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 100, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[5] * 100], None, SamplingParams(max_tokens=100))


def test_cli_version_help_defaults_and_a_missing_model():
    run = lambda *a: subprocess.run([sys.executable, "-m", "jslora", *a], capture_output=True, text=True, timeout=120)
    assert run("--version").stdout.strip() == f"jslora {__version__}"
    assert "(default: 256)" in run("serve", "--help").stdout
    missing = run("generate", "--model", "/no/such/model")
    assert missing.returncode == 2 and "config.json: not found" in missing.stderr and "Traceback" not in missing.stderr


def test_a_warm_server_compiles_nothing_for_any_request_mix(rng):
    """After warm-up no request compiles a step: every bucket, decode-only and with prompt chunks, greedy
    and top-k / top-p sampling, is compiled up front. A varied mix (adapters and the base model, prompts
    from 1 token to several chunks, every sampling kind, requests arriving while others run) compiles
    nothing, and the server's metric says so."""
    from fastapi.testclient import TestClient

    from jslora.server.app import create_app

    llm = LLM("dummy:tiny", {"a": "dummy:8", "b": "dummy:4:q,v,gate,down"}, max_lora_rank=16, max_model_len=256,
              engine=dict(max_batch=8, num_pages=4096, max_num_batched_tokens=64), warmup=True)
    engine, vocab = llm.engine, llm.config.vocab_size
    assert engine.compiles_after_warmup == 0 and engine.runner.compiles > 0
    samplings = [SamplingParams(max_tokens=6, temperature=0.0), SamplingParams(max_tokens=9, temperature=0.7),
                 SamplingParams(max_tokens=4, temperature=1.0, top_p=0.8, seed=3),
                 SamplingParams(max_tokens=7, temperature=0.9, top_k=5), SamplingParams(max_tokens=3, top_k=40,
                                                                                        top_p=0.5),
                 SamplingParams(max_tokens=3, temperature=0.0, logprobs=1, prompt_logprobs=2)]
    adapters = [None, "a", "b"]
    pending = [engine.add_request(rng.integers(3, vocab, int(n)).tolist(), samplings[i % len(samplings)],
                                  adapters[i % 3]) for i, n in enumerate(rng.integers(1, 200, size=14))]
    for wave in range(3):  # more requests join while the first ones run
        for _ in range(4):
            engine.step()
        pending += [engine.add_request(rng.integers(3, vocab, int(n)).tolist(), samplings[(i + wave) % 6],
                                       adapters[(i + wave) % 3]) for i, n in enumerate(rng.integers(1, 120, size=5))]
    while engine.has_unfinished():
        engine.step()
    assert all(r.finish_reason == "length" or r.finish_reason == "stop" for r in pending)
    assert any(len(r.prompt_logprobs) > 16 for r in pending)  # prompt logprobs came from several steps
    assert engine.compiles_after_warmup == 0
    with TestClient(create_app(llm, model_name="tiny")) as client:
        assert client.post("/v1/completions", json={"model": "b", "prompt": "hello there", "max_tokens": 3,
                                                    "top_p": 0.5}).status_code == 200
        metrics = client.get("/metrics").text
    assert "jslora_compiles_after_warmup_total 0.0" in metrics


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]), ("suffix", "end"),
    ("best_of", 2), ("top_logprobs", 3)])
def test_fields_the_server_cannot_do_are_refused_by_name(app_client, field, value):
    """Never silently ignored: a value the server cannot honour is a 400 naming the field (best_of other
    than n: no ranking; top_logprobs without logprobs); the neutral value an SDK may send is accepted."""
    client, _ = app_client
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "x"}]})):
        if field == "top_logprobs" and path == "/v1/completions":
            continue  # a chat field
        r = client.post(path, json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, r.text)
    neutral = {"response_format": {"type": "text"}, "tools": [], "suffix": "", "best_of": 1, "top_logprobs": None}
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, field: neutral[field]})
    assert r.status_code == 200, r.text


SAMPLING_FIELDS = [  # (request fields, SamplingParams fields): each checked against the plain reference
    ({"presence_penalty": 1.5, "frequency_penalty": 0.7}, {"presence_penalty": 1.5, "frequency_penalty": 0.7}),
    ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    ({"logit_bias": {"7": 12.0, "300": -100}}, {"logit_bias": {7: 12.0, 300: -100}}),
    ({"min_tokens": 5, "stop_token_ids": [78, 120]}, {"min_tokens": 5, "stop_token_ids": (78, 120)}),
    ({"logprobs": 3}, {"logprobs": 3}),
    ({"temperature": 0.9, "seed": 7, "presence_penalty": -1.0, "logprobs": 0},
     {"temperature": 0.9, "seed": 7, "presence_penalty": -1.0, "logprobs": 0}),
]


def test_penalties_bias_min_tokens_and_logprobs_match_the_reference_in_one_batch():
    """Each request field runs on the device, per row (one batch holds every setting, beside plain rows,
    with prompts split over several steps' chunks), and gives the tokens and logprobs of the plain
    float64 reference."""
    llm = LLM("dummy:tiny", {"a": "dummy:8"}, max_lora_rank=16, max_model_len=128,
              engine=dict(max_batch=8, num_pages=4096, max_num_batched_tokens=32))
    # the adapter's greedy output repeats token 78 on these prompts: the penalties have work to do
    prompts = [[5, 6, 7, 8, 9] * (1 + i % 3) + [5 + i] for i in range(len(SAMPLING_FIELDS))]
    samplings = [SamplingParams(max_tokens=8, ignore_eos=True, **({"temperature": 0.0} | fields))
                 for _, fields in SAMPLING_FIELDS]
    adapters = [None if i == 4 else "a" for i in range(len(samplings))]
    expected = llm.generate_reference(prompts, adapters, samplings)
    ours = llm.generate(prompts + [[3, 4]], adapters + [None], samplings + [SamplingParams(max_tokens=8)])[:-1]
    plain = llm.generate_reference(prompts, adapters, [SamplingParams(max_tokens=8, temperature=0.0,
                                                                      ignore_eos=True)] * len(prompts))
    for (fields, _), got, want, base in zip(SAMPLING_FIELDS, ours, expected, plain):
        assert got.token_ids == want.token_ids, fields
        if "temperature" not in fields and "logprobs" not in fields:
            assert got.token_ids != base.token_ids, fields  # the field really changed the output
        if "logprobs" in fields:
            k = fields["logprobs"]
            assert len(got.logprobs) == len(got.token_ids)
            for (lp, ids, values), (ref_lp, ref_ids, ref_values) in zip(got.logprobs, want.logprobs):
                assert abs(lp - ref_lp) < 1e-4 and ids == ref_ids and len(ids) == k
                np.testing.assert_allclose(values, ref_values, atol=1e-4)
                assert lp <= 0 and (not values or values[0] >= lp - 1e-6)
        else:
            assert got.logprobs is None
    assert ours[3].token_ids[:5].count(78) == 0 and ours[3].finish_reason == "length"


def test_prompt_logprobs_survive_preemption():
    """A request asking for its prompt's logprobs is preempted after its prefill (as memory pressure
    would: KV freed, tokens recomputed later): its prompt logprobs and tokens equal the reference."""
    from serving import run_until_done

    llm = LLM("dummy:tiny", {"a": "dummy:8"}, max_lora_rank=16, max_model_len=128,
              engine=dict(max_batch=4, num_pages=4096, max_num_batched_tokens=32))
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    prompt = [(11 * i) % 250 + 3 for i in range(55)]  # 2 chunks of the 32-row budget
    want = llm.generate_reference([prompt], "a", sampling)[0]
    engine = llm.engine
    request = engine.add_request(prompt, sampling, "a")
    while len(request.generated) < 2:
        engine.step()
    engine.scheduler.preempt(request)
    out = run_until_done(engine, [request])[request.request_id]
    assert request.num_preemptions == 1 and out.token_ids == want.token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for got, ref in zip(out.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert abs(got[0] - ref[0]) < 1e-4 and got[1] == ref[1]
        np.testing.assert_allclose(got[2], ref[2], atol=1e-4)


def test_openai_fields_round_trip_through_the_client(app_client):
    """The official client: n > 1, several prompts, echo, logprobs (completions and chat), penalties."""
    import openai
    from fastapi.testclient import TestClient  # noqa: F401 - the client below talks to the same app

    client, llm = app_client
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    out = sdk.completions.create(model="a", prompt=["one", "two"], n=2, max_tokens=4, temperature=0.8, seed=3,
                                 extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3] and out.usage.completion_tokens == 16
    by_index = {c.index: c.text for c in out.choices}
    for i, prompt in enumerate(["one", "two"]):
        for j in range(2):
            want = llm.generate_reference([prompt], "a", SamplingParams(max_tokens=4, temperature=0.8, seed=3 + j,
                                                                        ignore_eos=True))[0].text
            assert by_index[2 * i + j] == want
    assert by_index[0] != by_index[1]  # sample j draws from seed + j
    echo = sdk.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    plain = sdk.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert echo.choices[0].text == "hello" + plain.choices[0].text
    lp = sdk.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, logprobs=2,
                                extra_body={"ignore_eos": True}).choices[0].logprobs
    want = llm.generate_reference(["hello"], None, SamplingParams(max_tokens=3, temperature=0.0, logprobs=2,
                                                                  ignore_eos=True))[0]
    np.testing.assert_allclose(lp.token_logprobs, [x[0] for x in want.logprobs], atol=1e-4)
    assert len(lp.top_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = sdk.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2, presence_penalty=1.0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    stream = sdk.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=3, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3] and texts[0] == texts[1]  # greedy: both samples agree
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]
    joined = [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": ""},
              {"role": "user", "content": "again"}]
    r = client.post("/tokenize", json={"messages": parts})
    assert r.status_code == 200 and r.json()["tokens"] == llm.chat_prompt_ids(joined)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400
    # streamed logprobs: each chunk carries those of the tokens since the last chunk, all of them in the end
    streamed = []
    for chunk in sdk.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, logprobs=2,
                                        stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    np.testing.assert_allclose(streamed, lp.token_logprobs, atol=1e-6)
    streamed = []
    for chunk in sdk.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             temperature=0, logprobs=True, top_logprobs=2, presence_penalty=1.0,
                                             stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += [c.logprob for c in chunk.choices[0].logprobs.content]
    np.testing.assert_allclose(streamed, [c.logprob for c in content], atol=1e-6)
    # echo with logprobs: the prompt's tokens have theirs too (None for the first), then the completion's
    ids = llm.encode("hello there")
    want = llm.generate_reference([ids], None, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                              logprobs=2, prompt_logprobs=2))[0]
    want_values = [e[0] for e in want.prompt_logprobs[1:]] + [e[0] for e in want.logprobs]
    echoed = sdk.completions.create(model="tiny", prompt="hello there", max_tokens=3, temperature=0, echo=True,
                                    logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    lp = echoed.logprobs
    assert echoed.text.startswith("hello there") and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    np.testing.assert_allclose(lp.token_logprobs[1:], want_values, atol=1e-4)
    assert lp.text_offset[len(ids)] == len("hello there")  # the completion's offsets follow the prompt's text
    streamed = []
    for chunk in sdk.completions.create(model="tiny", prompt="hello there", max_tokens=3, temperature=0, echo=True,
                                        logprobs=2, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed[0] is None
    np.testing.assert_allclose(streamed[1:], want_values, atol=1e-4)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["x"] * 9, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "logit_bias": {"999999": 5}})
    assert r.status_code == 400 and "logit_bias" in r.text


def test_stop_token_ids_stop_string_kept_and_chat_lengths(app_client):
    """stop_token_ids end a request like EOS (even with ignore_eos); include_stop_str_in_output keeps the
    stop string; chat's max_completion_tokens is its max_tokens, and without either chat runs to the end
    of the context (as vLLM); stream_options.include_usage adds OpenAI's usage-only last chunk."""
    import json

    client, llm = app_client
    prompt = llm.encode("the quick brown fox")
    # the plain model (not the engine, which the app's thread steps): the greedy tokens the server must give
    greedy = llm.generate_reference([prompt], None, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    ids = greedy.token_ids
    base = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}

    stop_at = next(i for i, t in enumerate(ids) if t not in ids[:i])  # its first occurrence ends the request
    r = client.post("/v1/completions", json={**base, "stop_token_ids": [ids[stop_at]]}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == stop_at + 1
    assert r["choices"][0]["text"] == llm.decode(ids[:stop_at])
    assert client.post("/v1/completions", json={**base, "stop_token_ids": [-1]}).status_code == 400

    text = llm.decode(ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        cut = text.find(stop)
        kept = client.post("/v1/completions", json={**base, "stop": [stop], "include_stop_str_in_output": True})
        dropped = client.post("/v1/completions", json={**base, "stop": [stop]})
        assert kept.json()["choices"][0]["text"] == text[:cut + len(stop)]
        assert dropped.json()["choices"][0]["text"] == text[:cut]

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "ignore_eos": True}
    r = client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3
    r = client.post("/v1/chat/completions", json=chat).json()
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == llm.max_model_len
    assert r["choices"][0]["finish_reason"] == "length"

    lines = client.post("/v1/completions", json={**base, "stream": True, "stream_options": {"include_usage": True}}
                        ).text.splitlines()
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"


def test_a_port_in_use_fails_before_loading():
    """As vLLM: the port is bound first, so a clash is reported at once, not after loading and compiling."""
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jslora.serve", "--demo", "--port", str(taken.getsockname()[1])],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "cannot listen on 127.0.0.1" in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - t0 < 30 and "compiling" not in proc.stderr


def test_seeds_of_any_64_bit_value_are_accepted(app_client):
    client, _ = app_client
    for seed in (2**40 + 3, -5, 2**63 - 1):
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, "seed": seed})
        assert r.status_code == 200, r.text
    a, b = (client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 1.0,
                                                 "seed": 2**40 + 3}).json()["choices"][0]["text"] for _ in range(2))
    assert a == b
