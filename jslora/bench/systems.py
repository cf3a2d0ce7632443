"""The systems `jslora bench` compares on one trace, each built as an engine(-like) object with
add_request / step / has_unfinished:

  jslora       the engine as configured (unified pool, MBGMV/MBGMM kernels, the chosen policy)
  no-prefix-cache  the same engine without its prefix cache (every prompt computed in full)
  base-only    the same engine without LoRA targets, every request served by the base model: no LoRA
               kernel runs (the upper bound, as S-LoRA measures it)
  bmm          LoRA through plain gathers + padded batched matmul (S-LoRA's "bmm" ablation)
  peft-style   one adapter per running batch, switching when the batch drains
  no-unified   adapters in a fixed buffer (a quarter of the pool), KV in the rest
  merged       one copy of the weights with each adapter merged in, for as many adapters as fit
               (S-LoRA's "vLLM-packed"); the weights a LoRA does not touch are shared
"""
from __future__ import annotations

import dataclasses
import gc

import jax
import jax.numpy as jnp

from jslora.bench.baselines import BMM, WITHOUT_LORA_COMMUNICATION, SingleAdapter, split_pool
from jslora.engine import Engine, EngineConfig
from jslora.engine.adapter_store import load_adapter_spec
from jslora.model.llama import add_to_projection, projection_of

SYSTEMS = ("jslora", "no-prefix-cache", "base-only", "bmm", "peft-style", "no-unified", "merged")


def engine_options_for(system: str, base: EngineConfig, *, lora_communication: bool = True) -> tuple:
    """(EngineConfig, Engine keyword arguments) of one system."""
    backend = None if lora_communication else WITHOUT_LORA_COMMUNICATION
    if system == "bmm":
        return base, {"backend": BMM}
    if system == "peft-style":
        return base, {"backend": backend, "policy": SingleAdapter()}
    if system == "no-unified":
        return base, {"backend": backend, "allocators": split_pool(0.25)}
    if system == "no-prefix-cache":
        return dataclasses.replace(base, enable_prefix_caching=False), {"backend": backend}
    if system == "base-only":  # no LoRA targets: its steps launch no LoRA kernel (not even on empty tiles)
        return dataclasses.replace(base, lora_targets=()), {"backend": backend}
    return base, {"backend": backend}


class MergedEngines:
    """One engine per adapter over merged weights, stepped in turn (their steps queue on the GPU)."""

    def __init__(self, params, cfg, dtype, config: EngineConfig, adapters: dict[str, str], *, max_copies: int):
        self.model_config = cfg
        loras = {}
        for name, spec in list(adapters.items())[:max_copies]:
            loras[name] = load_adapter_spec(spec, cfg, config.max_lora_rank, name)
            if len(loras) >= self._copies_that_fit(params, config, loras[name]):
                break
        merged = {name: self._merge(params, lora, cfg) for name, lora in loras.items()}
        pages = self._pages_each(cfg, dtype, config, len(merged))
        self.engines = {name: Engine(p, cfg, dtype, dataclasses.replace(config, num_pages=pages or config.num_pages))
                        for name, p in merged.items()}

    @staticmethod
    def _copies_that_fit(params, config, lora) -> int:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return 1 << 30
        copied = {projection_of(lp, t) for t in lora.weights for lp in params["layers"][:1]}
        copy_bytes = sum(lp[name].nbytes for lp in params["layers"] for name in copied)
        free = stats["bytes_limit"] * config.gpu_memory_utilization - stats["bytes_in_use"]
        return max(1, int(free * 0.6 // copy_bytes))  # keep 40% of what is free for the KV pools

    @staticmethod
    def _merge(params, lora, cfg) -> dict:
        layers = []
        for i, lp in enumerate(params["layers"]):
            lp = dict(lp)
            for target, (a, b) in lora.weights.items():
                add_to_projection(lp, cfg, target, jnp.asarray(a[i], jnp.float32) @ jnp.asarray(b[i], jnp.float32))
            layers.append(lp)
        return {**params, "layers": layers}

    @staticmethod
    def _pages_each(cfg, dtype, config, copies: int) -> int | None:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats or not copies:
            return None
        free = stats["bytes_limit"] * config.gpu_memory_utilization - stats["bytes_in_use"]
        page_bytes = cfg.num_layers * cfg.kv_width * jnp.dtype(dtype).itemsize
        return int(free * 0.8 / copies // page_bytes)

    def add_request(self, prompt_ids, sampling, adapter=None, **kw):
        if adapter not in self.engines:
            raise KeyError(f"merged: adapter {adapter!r} has no merged copy (only {len(self.engines)} fit)")
        return self.engines[adapter].add_request(prompt_ids, sampling, None, **kw)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines.values())

    def step(self):
        updates = []
        for engine in self.engines.values():
            if engine.has_unfinished():
                updates += engine.step()
        return updates

    def warmup(self, filtered: bool = True):
        return sum(e.warmup(progress=False, filtered=filtered) for e in self.engines.values())

    def stats(self) -> dict:
        return {"copies": len(self.engines)}


def build_system(system: str, params, cfg, dtype, base: EngineConfig, adapters: dict[str, str], *,
                 merged_max_copies: int = 8, lora_communication: bool = True):
    """lora_communication=False: the tensor-parallel cost study (wrong outputs; jslora.bench.baselines)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
    if system == "merged":
        return MergedEngines(params, cfg, dtype, base, adapters, max_copies=merged_max_copies)
    config, options = engine_options_for(system, base, lora_communication=lora_communication)
    engine = Engine(params, cfg, dtype, config, **options)
    if system != "base-only":
        for name, spec in adapters.items():
            engine.register_adapter(name, spec, lazy=True)  # files on disk are read on first use
        engine.step()  # apply the registrations
    return engine


def engine_counters(system) -> dict:
    if isinstance(system, MergedEngines):
        return system.stats()
    m = system.memory_stats()
    keys = ("adapter_loads", "adapter_evictions", "adapter_source_loads", "preemptions", "fitted_steps",
            "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "prefix_cache_evictions")
    return {k: m[k] for k in keys if k in m} | {"dropped": system.stats.dropped, "pool_blocks": m["pool_blocks"]}


def delta(after: dict, before: dict) -> dict:
    return {k: (v - before.get(k, 0) if isinstance(v, (int, float)) and k not in ("pool_blocks", "copies") else v)
            for k, v in after.items()}


def free(system) -> None:
    """Give the system's device memory back (its pool above all) before the next one is built."""
    engines = list(system.engines.values()) if isinstance(system, MergedEngines) else [system]
    for engine in engines:
        engine.close()
    if isinstance(system, MergedEngines):
        system.engines.clear()
    gc.collect()

