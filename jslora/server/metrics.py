"""Prometheus metrics: request and token counters, latency histograms, and the pool's state read
from the engine at scrape time."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class EngineCollector:
    def __init__(self, engine, model_name: str = ""):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        e = self.engine
        m = e.memory_stats()
        gauges = {
            "jslora_requests_running": ("Requests in the running batch", m["running"]),
            "jslora_requests_waiting": ("Requests waiting to be admitted", m["waiting"]),
            "jslora_pool_pages_kv": ("Pool pages held by KV caches", m["kv_blocks"] * m["block_pages"]),
            "jslora_pool_pages_adapters": ("Pool pages held by adapters", m["adapter_blocks"] * m["block_pages"]),
            "jslora_pool_pages_free": ("Free pool pages", m["free_blocks"] * m["block_pages"]),
            "jslora_adapters_gpu": ("Adapters resident in the GPU pool", m["adapters_on_gpu"]),
            "jslora_adapters_host": ("Adapters cached in host RAM", m["adapters_on_host"]),
        }
        if "prefix_cache_blocks" in m:
            gauges["jslora_prefix_cache_blocks"] = ("KV blocks (K and V pairs) kept by the prefix cache",
                                                    m["prefix_cache_blocks"])
            gauges["jslora_pool_pages_prefix_cache"] = ("Pool pages of cached prompt KV no request holds (evictable)",
                                                        m["prefix_cache_idle_blocks"] * m["block_pages"])
            gauges["jslora_prefix_cache_hit_rate"] = ("Share of admitted prompt tokens found in the prefix cache",
                                                      m["prefix_cache_hit_rate"])
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "jslora_requests_finished": ("Requests finished", e.stats.finished),
            "jslora_requests_aborted": ("Requests aborted", e.stats.aborted),
            "jslora_prompt_tokens": ("Prompt tokens prefilled", e.stats.prompt_tokens),
            "jslora_generation_tokens": ("Tokens generated", e.stats.generated_tokens),
            "jslora_adapter_loads": ("Adapter copies into the GPU pool", m["adapter_loads"]),
            "jslora_adapter_evictions": ("Adapters evicted from the GPU pool", m["adapter_evictions"]),
            "jslora_preemptions": ("Requests preempted for recomputation", m["preemptions"]),
            "jslora_step_failures": ("Requests ended by a failure of their own step", e.stats.step_failures),
            "jslora_compiles_after_warmup": ("Step variants compiled after warm-up (each stalls every request "
                                             "for seconds; 0 once warm)", e.compiles_after_warmup),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        yield from self._vllm_named(m)

    def _vllm_named(self, m: dict):
        """The gauges dashboards and routers built for vLLM read, under vLLM's names."""
        e, labels = self.engine, ["model_name"]
        for name, doc, value in (
                ("vllm:num_requests_running", "Requests in the running batch", m["running"]),
                ("vllm:num_requests_waiting", "Requests waiting to be admitted", m["waiting"]),
                ("vllm:gpu_cache_usage_perc", "Share of the unified pool held by KV caches (0-1)",
                 m["kv_blocks"] / max(1, m["pool_blocks"]))):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], value)
            yield family
        counters = [("vllm:prompt_tokens", "Prompt tokens prefilled", e.stats.prompt_tokens),
                    ("vllm:generation_tokens", "Tokens generated", e.stats.generated_tokens),
                    ("vllm:num_preemptions", "Requests preempted", m["preemptions"])]
        if "prefix_cache_blocks" in m:
            counters += [("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                          m["prefix_cache_queried_tokens"]),
                         ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                          m["prefix_cache_hit_tokens"])]
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], value)
            yield family
        running = sorted({r.adapter_name for r in list(e.scheduler.running) if r.adapter_name})
        waiting = sorted({r.adapter_name for r in list(e.scheduler.waiting) if r.adapter_name})
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting adapters (value: scrape time)",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(running), ",".join(waiting), str(e.config.max_adapters)], time.time())
        yield info


class ServerMetrics:
    def __init__(self, engine, model_name: str = ""):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        self.first_token = Histogram("jslora_time_to_first_token_seconds", "Time to first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("jslora_request_latency_seconds", "End-to-end request latency",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.http_errors = Counter("jslora_http_errors", "Requests refused with an error", ["code"],
                                   registry=self.registry)
