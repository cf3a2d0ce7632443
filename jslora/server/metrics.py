"""Prometheus metrics: request and token counters, latency histograms, and the pool's state read
from the engine at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

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
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.first_token = Histogram("jslora_time_to_first_token_seconds", "Time to first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("jslora_request_latency_seconds", "End-to-end request latency",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.http_errors = Counter("jslora_http_errors", "Requests refused with an error", ["code"],
                                   registry=self.registry)
