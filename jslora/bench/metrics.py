"""What a replay is judged by (S-LoRA's metrics): throughput, latency, first-token latency, SLO
attainment and user satisfaction (1 - (t / SLO)^2 for a first token after t < SLO seconds, else 0;
dropped requests count 0 for both), and per-client fairness."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class RequestRecord:
    arrival: float                 # seconds from the start of the replay
    adapter: str | None
    client: str | None
    prompt_len: int
    output_len: int                # tokens generated
    first_token: float | None      # seconds from the start; None if dropped or failed
    finish: float | None
    error: str | None = None


def satisfaction(first_token_latency: float | None, slo_s: float) -> float:
    if first_token_latency is None or first_token_latency >= slo_s:
        return 0.0
    return 1.0 - (first_token_latency / slo_s) ** 2


def summarize(records: list[RequestRecord], wall_s: float, slo_s: float = 6.0) -> dict:
    done = [r for r in records if r.error is None and r.finish is not None]
    latency = np.array([r.finish - r.arrival for r in done]) if done else np.zeros(1)
    ttft_all = [None if r.first_token is None or r.error else r.first_token - r.arrival for r in records]
    ttft = np.array([t for t in ttft_all if t is not None]) if done else np.zeros(1)
    per_client: dict = {}
    for r in done:
        c = per_client.setdefault(str(r.client), {"requests": 0, "service": 0.0, "ttft": []})
        c["requests"] += 1
        c["service"] += r.prompt_len + 2 * r.output_len
        c["ttft"].append(r.first_token - r.arrival)
    services = np.array([c["service"] for c in per_client.values()]) if per_client else np.zeros(1)
    # fairness as a light client sees it: first-token latency of the clients that sent fewer requests
    # than the median client, beside that of the others
    counts = np.array([c["requests"] for c in per_client.values()]) if per_client else np.zeros(1)
    median = float(np.median(counts))
    light = [t for c in per_client.values() if c["requests"] < median for t in c["ttft"]]
    heavy = [t for c in per_client.values() if c["requests"] >= median for t in c["ttft"]]
    # the steady window: from a tenth of the arrivals' span to the last arrival (arrivals still coming),
    # so neither the ramp-up nor the drain after the last arrival hides or fakes anything
    last_arrival = max((r.arrival for r in records), default=0.0)
    lo, hi = 0.1 * last_arrival, last_arrival
    steady = [r for r in done if lo <= r.finish <= hi]
    return {
        "requests": len(records), "finished": len(done), "dropped": len(records) - len(done),
        "wall_s": wall_s,
        "throughput_req_s": len(done) / wall_s,
        "throughput_steady_req_s": len(steady) / (hi - lo) if hi > lo else None,
        "throughput_steady_tok_s": sum(r.output_len for r in steady) / (hi - lo) if hi > lo else None,
        "throughput_tok_s": sum(r.output_len for r in done) / wall_s,
        "latency_avg_s": float(latency.mean()), "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "first_token_avg_s": float(ttft.mean()), "first_token_p50_s": float(np.percentile(ttft, 50)),
        "first_token_p99_s": float(np.percentile(ttft, 99)),
        "slo_s": slo_s,
        "slo_attainment": float(np.mean([t is not None and t < slo_s for t in ttft_all])) if records else 0.0,
        "user_satisfaction": float(np.mean([satisfaction(t, slo_s) for t in ttft_all])) if records else 0.0,
        # Jain's index over the clients' weighted service (1 = equal shares)
        "fairness_jain": (float(services.sum() ** 2 / (len(services) * (services ** 2).sum()))
                          if services.any() else 1.0),
        "clients": len(per_client),
        "first_token_light_clients_avg_s": float(np.mean(light)) if light else None,
        "first_token_heavy_clients_avg_s": float(np.mean(heavy)) if heavy else None,
    }
