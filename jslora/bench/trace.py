"""S-LoRA's synthetic workload (benchmarks/trace.py of S-LoRA, same distributions).

Arrivals form a gamma process: inter-arrival times ~ Gamma(shape 1/cv^2, scale cv^2/rate), so the
mean rate is `rate` and cv = 1 is a Poisson process; larger cv gives bursts. The adapter of each
request is floor(n * u), u ~ Power(alpha) (density alpha * u^(alpha-1)): alpha = 1 is uniform, smaller
alpha crowds the traffic onto the low-numbered adapters. Prompt and output lengths are uniform in their
ranges (upper bound excluded). Adapter i has rank ranks[i % len(ranks)], as S-LoRA assigns its dummy
adapter directories.

With `shared_prefix` (lo, hi), every adapter (and the base model) has its own system prompt of a length
uniform in [lo, hi), the same in each of its requests, before the request's own prompt (the workload
prefix caching serves: a tenant's instructions, then short user turns).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival: float          # seconds from the start of the trace
    adapter: str | None     # None: the base model
    prompt_len: int
    output_len: int
    client: str | None = None  # who is served fairly (default: the adapter)
    prefix_len: int = 0        # tokens of its adapter's system prompt before the prompt_len of its own
    prefix_seed: int = 0       # which system prompt (its tokens are drawn from this seed)


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    num_adapters: int = 100
    alpha: float = 1.0
    rate: float = 10.0           # requests per second
    cv: float = 1.0
    duration: float = 120.0      # seconds
    input_range: tuple[int, int] = (8, 512)
    output_range: tuple[int, int] = (8, 512)
    seed: int = 42
    shared_prefix: tuple[int, int] | None = None  # system prompt length range per adapter

    def __post_init__(self):
        for name in ("rate", "cv", "duration", "alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trace {name} must be positive, got {getattr(self, name)}")
        for name in ("input_range", "output_range", "shared_prefix"):
            if getattr(self, name) is None:
                continue
            lo, hi = getattr(self, name)
            if not 1 <= lo < hi:
                raise ValueError(f"trace {name} must be [low, high) with 1 <= low < high, got {(lo, hi)}")
        if self.num_adapters < 0:
            raise ValueError("num_adapters must be >= 0 (0: base model only)")


def adapter_name(i: int) -> str:
    return f"lora-{i}"


def adapter_ranks(num_adapters: int, ranks: list[int]) -> dict[str, int]:
    return {adapter_name(i): ranks[i % len(ranks)] for i in range(num_adapters)}


def generate_trace(config: TraceConfig) -> list[TraceRequest]:
    rng = np.random.default_rng(config.seed)
    total = int(config.rate * config.duration)
    ids = (rng.power(config.alpha, total) * config.num_adapters).astype(int)
    prompt = rng.integers(*config.input_range, total)
    output = rng.integers(*config.output_range, total)
    shape, scale = 1.0 / config.cv ** 2, config.cv ** 2 / config.rate
    arrivals = np.cumsum(rng.gamma(shape, scale, total))
    # system prompts: one per adapter (index num_adapters: the base model), from a stream of their own
    # so the rest of the trace is the same with and without them
    prefix = (np.random.default_rng([config.seed, 1]).integers(*config.shared_prefix, config.num_adapters + 1)
              if config.shared_prefix else np.zeros(config.num_adapters + 1, int))
    owner = ids if config.num_adapters else np.full(total, 0)
    return [TraceRequest(float(t), adapter_name(int(i)) if config.num_adapters else None, int(p), int(o),
                         prefix_len=int(prefix[i]), prefix_seed=int(i) + 1)
            for t, i, p, o in zip(arrivals, owner, prompt, output)]
