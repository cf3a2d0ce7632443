"""Hostile tenants over real HTTP (the demo server of tests/serving.py): extreme and ill-typed fields,
broken unicode, huge bodies, malformed adapters, clients that disconnect or retry. Every one gets a
clear OpenAI-format 4xx, no 5xx; the server keeps serving; another tenant's output stays exactly what
it is alone; no page is left held afterwards."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from jslora import SamplingParams

from serving import API_KEY, Victim, assert_openai_error, http, metric, wait_until_idle

# (field, value) pairs that must get a 400 naming the field; top_k 2**31 once aborted every stream
BAD_FIELDS = [
    ("top_k", 2**31), ("top_k", 2**63), ("top_k", -2), ("top_k", 1.5), ("top_k", "5"),
    ("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 0), ("max_tokens", 2**31), ("max_tokens", 2.0),
    ("temperature", -1), ("temperature", "1"), ("temperature", 1e9), ("top_p", 0), ("top_p", 1.5),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", True), ("seed", 1.5), ("n", 0), ("n", 17),
    ("presence_penalty", 2.5), ("frequency_penalty", "1"), ("repetition_penalty", 0), ("logit_bias", {"5": 101}),
    ("logit_bias", {"x": 1}), ("logprobs", 21), ("logprobs", -1), ("min_tokens", -1), ("min_tokens", 10),
    ("stream", "yes"), ("stream", 1), ("ignore_eos", "no"),
    ("stop", [1]), ("stop", ["a"] * 17), ("prompt", [True]), ("prompt", [1.5]), ("prompt", [-1]),
    ("prompt", {"x": 1}), ("user", 5), ("model", 5), ("cache_salt", 5), ("cache_salt", ""),
    ("cache_salt", "s" * 257),
]


def test_extreme_and_ill_typed_fields_get_400_and_never_touch_other_requests(server, local_llm):
    victim = Victim(server)
    for field, value in BAD_FIELDS:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2, field: value}
        assert_openai_error(http(server, "POST", "/v1/completions", json=body), 400, field)
    for raw in (b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "x", "top_p": Infinity}'):
        r = http(server, "POST", "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
    victim.finish(local_llm)
    assert metric(server, "jslora_step_failures") == 0
    wait_until_idle(server)


def test_broken_unicode_gets_400_and_real_unicode_works(server):
    for raw, status in ((b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', 400),
                        (b'{"model": "a", "messages": [{"role": "user", "content": "hi \\udfff"}]}', 400),
                        (b'{"model": "\\ud800", "prompt": "x"}', 400),
                        (b'{"lora_name": "x", "lora_path": "\\ud800"}', 400)):
        path = "/v1/chat/completions" if b"messages" in raw else (
            "/v1/load_lora_adapter" if b"lora_name" in raw else "/v1/completions")
        r = http(server, "POST", path, content=raw, headers={"content-type": "application/json"})
        assert_openai_error(r, status)
    r = http(server, "POST", "/v1/completions", json={"model": "b", "prompt": "日本語 🙂 ünïcödé", "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_huge_bodies_and_prompts_are_refused_while_health_answers_fast(server):
    """A body over the limit gets 413 before it is parsed; a prompt under it but longer than the
    context can hold gets 400 without being tokenized; /health answers within 100 ms throughout."""
    latencies, done = [], threading.Event()

    def probe():
        with httpx.Client(timeout=5) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get(f"{server['base']}/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        huge = json.dumps({"model": "tiny", "prompt": "x" * (9 << 20)}).encode()  # over the 8 MiB default
        for _ in range(2):
            try:
                r = http(server, "POST", "/v1/completions", content=huge, headers={"content-type": "application/json"})
                assert_openai_error(r, 413)
            except httpx.TransportError:
                pass  # the server may close the connection before the client finishes sending
        # chunked (no Content-Length): counted as it arrives
        chunks = [huge[i: i + (1 << 20)] for i in range(0, len(huge), 1 << 20)]
        r = http(server, "POST", "/v1/completions", content=iter(chunks),
                 headers={"content-type": "application/json"})
        assert_openai_error(r, 413)
        maximal = json.dumps({"model": "tiny", "prompt": "hello " * ((8 << 20) // 6 - 100)}).encode()
        for path, body in (("/v1/completions", maximal),
                           ("/v1/chat/completions",
                            maximal.replace(b'"prompt": ', b'"messages": [{"role": "user", "content": ')
                            .replace(b'"}', b'"}]}'))):
            t0 = time.perf_counter()
            r = http(server, "POST", path, content=body, headers={"content-type": "application/json"})
            assert_openai_error(r, 400)
            assert "maximum context length" in r.json()["error"]["message"]
            assert time.perf_counter() - t0 < 2.0
    finally:
        done.set()
        prober.join()
    # health is never stuck behind a huge body (that would take seconds); the prober shares this process's
    # GIL with the client serializing 9 MiB bodies, so one probe may wait a little on a 2-core machine
    latencies.sort()
    assert len(latencies) >= 5 and latencies[len(latencies) // 2] < 0.05 and latencies[-1] < 0.5, latencies[-5:]


# the kinds of adapter_config.json that once gave a 500 with a plain-text body
BAD_ADAPTER_CONFIGS = ["[1, 2]", "null", "42", '"s"', '{"r": 4, "lora_alpha": null}', '{"r": null}',
                       '{"r": 4, "rank_pattern": [1]}', '{"r": 4, "alpha_pattern": {"q_proj": null}}',
                       '{"r": 4, "peft_type": 5}', "[" * 100_000 + "]" * 100_000, '{"r": "eight"}',
                       '{"r": 4, "lora_alpha": NaN}', '{"r": 4, "fan_in_fan_out": true}',
                       '{"r": 4, "layers_to_transform": "zero"}']


def test_malformed_adapters_and_names_get_400(server, checkpoints):
    import shutil

    from safetensors.numpy import load_file, save_file

    root = server["root"]
    good = checkpoints["mha"]["adapters"]["r4_qv"]  # the wrong model's shapes, but a valid safetensors file
    for i, text in enumerate(BAD_ADAPTER_CONFIGS):
        directory = root / f"bad-config-{i}"
        shutil.copytree(good, directory)
        (directory / "adapter_config.json").write_text(text)
        r = http(server, "POST", "/v1/load_lora_adapter", json={"lora_name": f"bad{i}", "lora_path": str(directory)})
        assert_openai_error(r, 400, "lora_path")
        assert "adapter_config.json" in r.json()["error"]["message"]
    directory = root / "zero-d"
    shutil.copytree(good, directory)
    weights = directory / "adapter_model.safetensors"
    save_file({k: v.ravel()[:1].reshape(()) for k, v in load_file(weights).items()}, weights)
    r = http(server, "POST", "/v1/load_lora_adapter", json={"lora_name": "zero-d", "lora_path": str(directory)})
    assert_openai_error(r, 400, "lora_path")

    for name in (" ", "../x", "a/../b", "", "x" * 300, "tab\tname"):
        r = http(server, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "dummy:4"})
        assert_openai_error(r, 400, "lora_name")
    r = http(server, "POST", "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "dummy:4"})
    assert_openai_error(r, 400, "lora_name")  # in use: vLLM refuses rather than silently replacing
    assert "already loaded" in r.json()["error"]["message"]
    assert {m["id"] for m in http(server, "GET", "/v1/models").json()["data"]} >= {"tiny", "a", "b", "c"}


@pytest.mark.parametrize("stream", [False, True])
def test_clients_that_give_up_have_their_requests_aborted_at_once(server, local_llm, stream):
    """12 clients that time out after 0.3 s (as a retrying client does) must not leave 12 requests
    running to completion: each is aborted as its connection closes, mid-request or mid-stream."""
    victim = Victim(server, max_tokens=60)
    aborted = metric(server, "jslora_requests_aborted")
    body = {"model": "b", "prompt": "give up", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": stream}

    def impatient(_):
        try:
            with httpx.Client(timeout=0.3, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
                if stream:
                    with c.stream("POST", f"{server['base']}/v1/completions", json=body) as r:
                        next(r.iter_lines())
                        return "read"  # leaving the block closes the stream
                c.post(f"{server['base']}/v1/completions", json=body)
        except httpx.TimeoutException:
            return "timeout"
        return "finished"

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(impatient, range(12)))
    assert "finished" not in results
    deadline = time.time() + 10
    while metric(server, "jslora_requests_aborted") < aborted + 12 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(server, "jslora_requests_aborted") >= aborted + 12
    # the retry that finally waits gets the whole answer, the same as a first try would
    retried = http(server, "POST", "/v1/completions", json={**body, "stream": False, "max_tokens": 30})
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    assert retried.json()["choices"][0]["text"] == local_llm.generate("give up", "b", greedy)[0].text
    victim.finish(local_llm)
    wait_until_idle(server, timeout=10)
