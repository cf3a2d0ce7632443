"""The HTTP server over real loopback HTTP: `python -m jslora.serve --demo` as a subprocess, driven by
the official openai client and raw httpx."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from jslora import SamplingParams

from serving import API_KEY, DEMO_ADAPTERS, Victim, assert_openai_error, http, metric, wait_until_idle


def test_openai_client_completes_and_streams(client, local_llm):
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for model, adapter in (("tiny", None), ("b", "b")):
        out = client.completions.create(model=model, prompt="hello there", max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
        expected = local_llm.generate("hello there", adapter, greedy)[0]
        assert out.choices[0].text == expected.text and out.usage.completion_tokens == 10
        chunks = list(client.completions.create(model=model, prompt="hello there", max_tokens=10, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            stream=True)
    assert any(c.choices[0].finish_reason for c in stream)
    assert {m.id for m in client.models.list().data} >= {"tiny", "a", "b", "c"}


def test_concurrent_mixed_adapter_requests_match_generate(client, local_llm):
    prompts = [f"request {i}: " + "xyz" * (i % 7) for i in range(64)]
    models = [["tiny", "a", "b", "c"][i % 4] for i in range(64)]
    max_tokens = [3 + i % 9 for i in range(64)]

    def one(i):
        return client.completions.create(model=models[i], prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(64)))
    expected = local_llm.generate(prompts, [None if m == "tiny" else m for m in models],
                                  [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens])
    assert texts == [e.text for e in expected]


BAD_REQUESTS = [
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("POST", "/v1/completions", {"model": "a"}, 400),                                 # no prompt
    ("POST", "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": -1}, 400),
    ("POST", "/v1/completions", {"model": "a", "prompt": "x", "temperature": 1e9}, 400),
    ("POST", "/v1/completions", {"model": "a", "prompt": "x", "top_p": 0}, 400),
    ("POST", "/v1/completions", {"model": "a", "prompt": "x" * 400, "max_tokens": 10}, 400),  # beyond the context
    ("POST", "/v1/completions", {"model": "a", "prompt": [10**9]}, 400),               # token id out of range
    ("POST", "/v1/chat/completions", {"model": "a", "messages": []}, 400),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 400),   # outside --lora-root
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "ROOT/corrupt"}, 400),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "ROOT/wrong-model"}, 400),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "dummy:999"}, 400),  # rank above max
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404),
]


def test_bad_input_gets_4xx_while_good_requests_finish(server, client):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(client.completions.create, model="c", prompt="steady", max_tokens=20, temperature=0)
                for _ in range(4)]
        for method, path, body, code in BAD_REQUESTS:
            if "lora_path" in body:
                body = {**body, "lora_path": body["lora_path"].replace("ROOT", str(server["root"]))}
            r = http(server, method, path, json=body)
            assert r.status_code == code, (path, body, r.text)
            assert "message" in r.json()["error"]
        r = http(server, "POST", "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = httpx.post(f"{server['base']}/v1/completions", json={"model": "a", "prompt": "x"}, timeout=30)
        assert r.status_code == 401
        assert all(len(f.result().choices[0].text) >= 0 and f.result().choices[0].finish_reason for f in good)
    assert http(server, "GET", "/health").status_code == 200


def test_disconnect_mid_stream_frees_pages(server):
    body = {"model": "a", "prompt": "a long one", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server['base']}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in got)
    wait_until_idle(server)
    assert metric(server, "jslora_requests_aborted") >= 1


def test_load_and_unload_during_traffic(server, client):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        traffic = [pool.submit(client.completions.create, model=m, prompt="busy", max_tokens=15, temperature=0)
                   for m in ["a", "b", "tiny", "c"] * 2]
        r = http(server, "POST", "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "dummy:6:q,v"})
        assert r.status_code == 200, r.text
        out = client.completions.create(model="fresh", prompt="new adapter", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
        assert http(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert all(f.result().choices[0].finish_reason for f in traffic)
    r = http(server, "POST", "/v1/completions", json={"model": "fresh", "prompt": "gone"})
    assert r.status_code == 404


def test_overload_gets_503_with_retry_after(server):
    body = {"model": "a", "prompt": "flood", "max_tokens": 60, "temperature": 0, "ignore_eos": True}

    def one(_):
        r = http(server, "POST", "/v1/completions", json=body)
        return r.status_code, r.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert all(retry == "1" for c, retry in results if c == 503)
    assert http(server, "GET", "/health").status_code == 200


def _inline_refs(node, components):
    """The OpenAPI body schema with its $refs to components inlined (for hypothesis-jsonschema)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(components[node["$ref"].split("/")[-1]], components)
        return {k: _inline_refs(v, components) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, components) for v in node]
    return node


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                                  "/v1/unload_lora_adapter"])
def test_fuzz_from_the_openapi_schema_finds_no_5xx(server, local_llm, path):
    """Property: any body (the schema's fields with values of any JSON type, or any JSON) gets a 2xx or
    an OpenAI-format 4xx, never a 5xx, while another tenant's stream runs unchanged; no page leaks."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    spec = http(server, "GET", "/openapi.json").json()
    components = spec["components"]["schemas"]
    body_schema = _inline_refs(spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"],
                               components)
    # bodies whose keys are the schema's fields (required ones mostly present) with values of any JSON
    # type, well-typed ones included; plus arbitrary JSON. max_tokens stays small to keep it quick.
    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                            max_leaves=10)
    fields = body_schema["properties"]
    typed = {"string": st.sampled_from(["a", "tiny", "hi", "", "dummy:4", "../x"]) | st.text(max_size=12),
             "integer": st.integers(-5, 2**40), "number": st.floats(allow_nan=True), "boolean": st.booleans()}

    def value(schema):
        kinds = [s.get("type") for s in schema.get("anyOf", [schema])]
        return st.one_of([typed[k] for k in kinds if k in typed] + [anything])

    valid = st.fixed_dictionaries({k: value(fields[k]) for k in body_schema.get("required", [])},
                                  optional={k: value(v) for k, v in fields.items()
                                            if k not in body_schema.get("required", [])})
    valid = valid.map(lambda b: {**b, "max_tokens": 3} if "max_tokens" in b and isinstance(b["max_tokens"], int)
                      and 0 < b["max_tokens"] else b)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(valid | anything)
    def check(body):
        if path == "/v1/unload_lora_adapter" and isinstance(body, dict) and str(body.get("lora_name")) in DEMO_ADAPTERS:
            body = {**body, "lora_name": "not-" + body["lora_name"]}  # keep the demo adapters for other tests
        # json.dumps writes NaN/Infinity too (not JSON): the server must refuse those with a 4xx as well
        r = http(server, "POST", path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert_openai_error(r, r.status_code)

    victim = Victim(server, max_tokens=200)
    check()
    victim.finish(local_llm)
    wait_until_idle(server)


def test_bench_replays_a_trace_over_http(server):
    """`jslora bench --url`: the trace's requests arrive on time, stream, and all finish."""
    import dataclasses

    from jslora.bench.metrics import summarize
    from jslora.bench.replay import replay_http
    from jslora.bench.trace import TraceConfig, generate_trace

    trace = generate_trace(TraceConfig(num_adapters=3, rate=8, duration=2, input_range=(4, 20), output_range=(2, 8)))
    trace = [dataclasses.replace(t, adapter="abc"[int(t.adapter.split("-")[1])]) for t in trace]
    records, wall = replay_http(server["base"], trace, base_model="tiny", vocab_size=256, api_key=API_KEY,
                                progress=False)
    summary = summarize(records, wall)
    assert summary["finished"] == len(trace) > 0, [r.error for r in records if r.error]
    assert all(r.output_len == t.output_len for r, t in zip(records, trace))
    assert all(r.first_token is not None and r.first_token >= r.arrival for r in records)
