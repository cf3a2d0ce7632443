"""Replay a trace at its arrival times: against an Engine in this process, or a server over HTTP.

Prompts are random token ids of the trace's lengths (after the request's system prompt, when the trace
has them: the same tokens in every request of its adapter); generation is greedy with EOS ignored, so every
request produces exactly its output length (as S-LoRA's benchmark does).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from jslora.bench.metrics import RequestRecord
from jslora.bench.trace import TraceRequest
from jslora.sampling import SamplingParams


def prompt_ids(trace: list[TraceRequest], vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefixes: dict[int, list[int]] = {}
    out = []
    for t in trace:
        if t.prefix_len and t.prefix_seed not in prefixes:
            prefixes[t.prefix_seed] = np.random.default_rng([seed, t.prefix_seed]).integers(
                3, vocab_size, t.prefix_len).tolist()
        own = rng.integers(3, vocab_size, t.prompt_len).tolist()
        out.append((prefixes[t.prefix_seed] if t.prefix_len else []) + own)
    return out


def replay_engine(engine, trace: list[TraceRequest], *, progress: bool = True, seed: int = 0,
                  adapter_of=lambda t: t.adapter, profile: tuple[float, float, str] | None = None,
                  report: Callable[[str], None] | None = None, report_every_s: float = 15.0
                  ) -> tuple[list[RequestRecord], float]:
    """Step the engine in this thread, adding each request when its arrival time comes.
    adapter_of maps a trace request to the adapter name the engine serves it with (baselines remap).
    profile (start, seconds, folder): a jax.profiler trace of that window of the replay. Starting and
    stopping the profiler stalls everything for seconds: the trace's clock stops meanwhile (those
    pauses are left out of the wall time and of every request's times).
    report: called every report_every_s with a line of counts (finished, running, waiting, steps), so a log
    without the progress bar still tells a stalled replay from a slow one."""
    prompts = prompt_ids(trace, engine.model_config.vocab_size, seed)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    records: list[RequestRecord | None] = [None] * len(trace)
    index_of: dict[str, int] = {}
    bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not progress)
    start = time.monotonic()
    pauses: list[tuple[float, float]] = []  # (when, seconds) of the profiler's own stalls

    def clock(at: float) -> float:
        """Seconds of trace time at monotonic time `at`."""
        return at - start - sum(d for t, d in pauses if t < at)

    def profiler(action) -> None:
        import jax

        t0 = time.monotonic()
        jax.profiler.start_trace(profile[2], create_perfetto_trace=True) if action == "start" else \
            jax.profiler.stop_trace()
        pauses.append((t0, time.monotonic() - t0))

    cursor, tracing, finished, next_report = 0, None, 0, time.monotonic() + report_every_s
    while cursor < len(order) or engine.has_unfinished():
        if report is not None and time.monotonic() >= next_report:
            next_report = time.monotonic() + report_every_s
            report(replay_counts(engine, finished, len(trace), cursor))
        now = clock(time.monotonic())
        if profile is not None and tracing is None and now >= profile[0]:
            profiler("start")
            tracing = True
        elif tracing and now >= profile[0] + profile[1]:
            profiler("stop")
            tracing = False
        while cursor < len(order) and trace[order[cursor]].arrival <= now:
            i = order[cursor]
            t = trace[i]
            sp = SamplingParams(max_tokens=t.output_len, temperature=0.0, ignore_eos=True)
            arrival = start + sum(d for _, d in pauses) + t.arrival  # monotonic, pauses included
            request = engine.add_request(prompts[i], sp, adapter_of(t), client=t.client, arrival=arrival)
            index_of[request.request_id] = i
            cursor += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.05, trace[order[cursor]].arrival - now)))
            continue
        for update in engine.step():
            if update.finished:
                i = index_of.pop(update.request_id)
                out, t = update.output, trace[i]
                m = out.metrics
                records[i] = RequestRecord(
                    t.arrival, t.adapter, t.client or t.adapter, len(prompts[i]), len(out.token_ids),
                    None if m.get("first_token_time") is None else clock(m["first_token_time"]),
                    None if m.get("finish_time") is None else clock(m["finish_time"]), out.error)
                bar.update()
                finished += 1
    if tracing:
        profiler("stop")
    bar.close()
    return records, clock(time.monotonic())


def replay_counts(engine, finished: int, total: int, added: int) -> str:
    """One line on where a replay stands: requests finished, running and queued, and engine steps so far."""
    return f"{finished}/{total} finished, {added - finished} added and unfinished " \
           f"({len(engine.scheduler.running)} running, {len(engine.scheduler.waiting)} waiting), " \
           f"{engine.stats.steps} steps"


async def _send(client, url: str, model: str, prompt: list[int], t: TraceRequest, start: float,
                headers) -> RequestRecord:
    body = {"model": model, "prompt": prompt, "max_tokens": t.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    if t.client:
        body["user"] = t.client
    first = finish = None
    tokens, error = 0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                error = (await response.aread()).decode(errors="replace")[:500]
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"].get("message", "error")
                        break
                    if first is None and (chunk["choices"][0].get("text") or chunk.get("usage")):
                        first = time.monotonic() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                finish = time.monotonic() - start
    except Exception as e:  # noqa: BLE001 - a failed request is recorded, the replay goes on
        error = f"{type(e).__name__}: {e}"
    return RequestRecord(t.arrival, t.adapter, t.client or t.adapter, len(prompt), tokens,
                         first if error is None else None, finish, error)


def replay_http(base_url: str, trace: list[TraceRequest], *, base_model: str, vocab_size: int,
                api_key: str | None = None, progress: bool = True, seed: int = 0) -> tuple[list[RequestRecord], float]:
    """Send each request at its arrival time to a running `jslora serve` (or any OpenAI-compatible
    server with LoRA adapters served as model names), streaming, and time its first token."""
    import httpx

    prompts = prompt_ids(trace, vocab_size, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
            bar = tqdm(total=len(trace), desc="requests", unit="req", disable=not progress)
            start = time.monotonic()

            async def one(i):
                t = trace[i]
                await asyncio.sleep(max(0.0, start + t.arrival - time.monotonic()))
                record = await _send(client, url, t.adapter or base_model, prompts[i], t, start, headers)
                bar.update()
                return record

            records = await asyncio.gather(*(one(i) for i in range(len(trace))))
            bar.close()
            return list(records), time.monotonic() - start

    return asyncio.run(main())
