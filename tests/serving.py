"""Helpers shared by test modules: stepping an engine to the end, and the demo server as a subprocess
over real loopback HTTP (its fixtures are session-wide, in conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx

from jslora import SamplingParams

API_KEY = "test-key"
DEMO_ADAPTERS = {"a": "dummy:8", "b": "dummy:16:q,v,gate,down", "c": "dummy:4:q,k,v,o,up"}


def run_until_done(engine, requests, on_step=None) -> dict:
    """Step the engine until every request finished; returns {request_id: output}."""
    outputs, steps = {}, 0
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                outputs[update.request_id] = update.output
        steps += 1
        if on_step is not None:
            on_step(steps)
        assert steps < 20_000
    assert set(outputs) >= {r.request_id for r in requests}
    return outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo_server(root, log_path, checkpoints):
    """`python -m jslora.serve --demo` with an API key and a --lora-root holding a few bad adapters;
    returns (process, base url) once /health answers. The log goes to a file: a pipe nobody reads
    would fill up and stall the server."""
    # a real PEFT adapter of another model lies inside the root: loading it must fail with 400
    shutil.copytree(checkpoints["mha"]["adapters"]["r4_qv"], root / "wrong-model")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jslora.serve", "--demo", "--port", str(port), "--api-key", API_KEY,
         "--lora-root", str(root), "--max-num-waiting", "40"],
        stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    base = f"http://127.0.0.1:{port}"
    # a cold start compiles the demo's 20 step variants: 120 s two at a time on an idle 2-core machine,
    # and twice that on a loaded one (a CI run once missed a 180-s deadline)
    deadline = time.time() + 480
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(open(log_path).read())
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def http(server, method, path, **kw):
    headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
    return httpx.request(method, f"{server['base']}{path}", headers=headers, timeout=kw.pop("timeout", 60), **kw)


def metric(server, name: str) -> float:
    text = http(server, "GET", "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise KeyError(name)


def wait_until_idle(server, timeout: float = 30) -> None:
    """Until no request runs and no KV page is held (every request finished or was aborted)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(server, "jslora_pool_pages_kv") == 0 and metric(server, "jslora_requests_running") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("requests still hold pages")


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["code"] == status and error["type"]
    if param is not None:
        assert error["param"] == param or param in error["message"], error


VICTIM_PROMPT = "a tenant minding its own business"


class Victim:
    """A streaming greedy request of another tenant that runs while the attacks happen; its text must
    equal what the same request gives alone."""

    def __init__(self, server, max_tokens=120):
        self.body = {"model": "a", "prompt": VICTIM_PROMPT, "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True, "stream": True}
        self.server, self.events, self.started = server, [], threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.started.wait(60)

    def _run(self):
        with httpx.stream("POST", f"{self.server['base']}/v1/completions", json=self.body, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.events.append(json.loads(line[6:]))
                    self.started.set()
        self.started.set()

    def finish(self, local_llm) -> None:
        self.thread.join(120)
        assert not any("error" in e for e in self.events), self.events[-1]
        assert self.events[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(e["choices"][0]["text"] for e in self.events)
        greedy = SamplingParams(max_tokens=self.body["max_tokens"], temperature=0.0, ignore_eos=True)
        assert text == local_llm.generate(VICTIM_PROMPT, "a", greedy)[0].text
