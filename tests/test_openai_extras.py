"""vLLM's extra endpoints (/tokenize, /detokenize, /version), its metric names, and the CLI's polish,
on an in-process app (no engine steps needed for most of it)."""
from __future__ import annotations

import subprocess
import sys

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
    client, _ = app_client
    assert client.get("/version").json() == {"version": __version__}
    r = client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:lora_requests_info"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in text
    assert 'max_lora="' in text


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
