"""Adapters resolved on first use (--lora-root with --lora-resolver), as vLLM's filesystem resolver:
1,000 PEFT directories on disk, none registered up front, with the GPU and host tiers bounded
(--max-loras, --max-cpu-loras)."""
from __future__ import annotations

import concurrent.futures
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jslora import LLM, SamplingParams

NUM_ADAPTERS = 1000


@pytest.fixture(scope="module")
def lora_root(checkpoints, tmp_path_factory):
    """NUM_ADAPTERS PEFT directories: peft's own config and tensor names (from a save_pretrained
    adapter), each with its own random weights."""
    template = checkpoints["mha"]["adapters"]["r8_all_rslora"]
    tensors = load_file(str(template / "adapter_model.safetensors"))
    root = tmp_path_factory.mktemp("lora-root")
    rng = np.random.default_rng(0)
    for i in range(NUM_ADAPTERS):
        d = root / f"tenant-{i:04d}"
        d.mkdir()
        shutil.copy(template / "adapter_config.json", d / "adapter_config.json")
        save_file({k: (rng.standard_normal(v.shape) * 0.2).astype(v.dtype) for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"))
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "x"}))
    return root


@pytest.fixture(scope="module")
def served(checkpoints, lora_root):
    from fastapi.testclient import TestClient

    from jslora.server.app import create_app

    llm = LLM(str(checkpoints["mha"]["dir"]), dtype="float32", max_lora_rank=8, max_model_len=64,
              engine=dict(max_batch=32, num_pages=4096, max_num_batched_tokens=128, max_adapters=48,
                          max_host_adapters=96))
    app = create_app(llm, model_name="base", lora_root=str(lora_root), lora_resolver=True)
    with TestClient(app) as http:
        yield llm, http


def complete(http, model, prompt, max_tokens=2):
    return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0, "ignore_eos": True})


def test_a_thousand_adapters_on_disk_are_served_on_first_use(served):
    llm, http = served
    assert not llm.adapters  # nothing registered up front
    names = [f"tenant-{i:04d}" for i in range(NUM_ADAPTERS)]
    prompts = [[5 + i % 50, 7, 9 + i % 13] for i in range(NUM_ADAPTERS)]

    def one(i):
        return complete(http, names[i], prompts[i])

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(NUM_ADAPTERS)))
    assert [r.status_code for r in responses] == [200] * NUM_ADAPTERS
    assert len(llm.adapters) == NUM_ADAPTERS
    stats = llm.engine.memory_stats()
    assert stats["adapters_on_gpu"] <= 48 and stats["adapters_on_host"] <= 96  # --max-loras, --max-cpu-loras
    # the first tenants left both tiers long ago: served again, their adapters are read from disk again
    again = [complete(http, names[i], prompts[i]) for i in range(4)]
    assert [r.json()["choices"][0]["text"] for r in again] == [r.json()["choices"][0]["text"] for r in responses[:4]]
    assert llm.engine.memory_stats()["adapter_source_loads"] >= 4
    # each tenant got its own adapter: outputs equal the reference model's with that adapter
    for i in (0, 1, 517, NUM_ADAPTERS - 1):
        want = llm.generate_reference([prompts[i]], names[i], SamplingParams(max_tokens=2, temperature=0.0,
                                                                             ignore_eos=True))[0].token_ids
        assert responses[i].json()["choices"][0]["text"] == llm.decode(want)
    models = {card["id"] for card in http.get("/v1/models").json()["data"]}
    assert set(names) <= models


def test_concurrent_first_requests_register_once(served, monkeypatch):
    llm, http = served
    name = "tenant-0999"
    llm.remove_adapter(name)
    registrations = []
    add_adapter = llm.add_adapter
    monkeypatch.setattr(llm, "add_adapter", lambda *a: (registrations.append(a), add_adapter(*a)))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: complete(http, name, [3, 4, 5]), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1 and len(registrations) == 1


@pytest.mark.parametrize("model, status", [
    ("no-such-tenant", 404),
    ("../lora-root", 404),          # only a name right under the root
    ("tenant-0001/..", 404),
    ("broken", 400),                 # a bad adapter: a clear error for its requests only
])
def test_names_that_do_not_resolve(served, model, status):
    _, http = served
    response = complete(http, model, [3, 4])
    assert response.status_code == status, response.text
    assert complete(http, "tenant-0002", [3, 4]).status_code == 200
