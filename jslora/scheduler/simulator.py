"""The scheduler under a simulated clock: the real Scheduler, allocator and adapter residency, with a
step-cost model in place of the GPU. Policies are compared and tested with it; it needs no device.

A step's cost is base + per prefill token + per decode row + per adapter loaded into the pool + per
distinct adapter among its rows (the LoRA rows it reads) + the matmuls (the weights' read, or the launched
rows, its bucket, where that takes longer) + per token of context its decode rows attend to; every request
in the step gets its token when the step ends (the engine's one-step lag is left out).
"""
from __future__ import annotations

import dataclasses
import itertools

from jslora.memory import AdapterResidency, BlockAllocator
from jslora.request import Request
from jslora.sampling import SamplingParams
from jslora.scheduler.policies import Policy
from jslora.scheduler.rows import launched_rows
from jslora.scheduler.rows import step_rows as step_rows_of
from jslora.scheduler.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class StepCost:
    base_s: float = 0.015            # reading the weights once
    prefill_token_s: float = 5e-5
    decode_row_s: float = 5e-5
    adapter_load_s: float = 0.002    # host -> pool copy of one adapter
    adapter_rows_s: float = 0.0      # one distinct adapter's LoRA rows read by the step's kernels
    weights_s: float = 0.0           # the matmuls' floor: their weights read once
    launched_row_s: float = 0.0      # the matmuls per launched row, where they are compute-bound
    context_token_s: float = 0.0     # a decode row's attention, per token of its context

    def step_seconds(self, prefill_tokens: int, decode_rows: int, adapter_loads: int, adapters: int = 0,
                     launched_rows: int = 0, context_tokens: int = 0) -> float:
        return (self.base_s + self.prefill_token_s * prefill_tokens + self.decode_row_s * decode_rows
                + self.adapter_load_s * adapter_loads + self.adapter_rows_s * adapters
                + max(self.weights_s, self.launched_row_s * launched_rows) + self.context_token_s * context_tokens)


@dataclasses.dataclass(frozen=True)
class SimAdapter:
    """What the scheduler needs of an adapter entry."""
    name: str
    uid: int
    num_pages: int


@dataclasses.dataclass
class SimResult:
    requests: list[Request]
    duration: float
    adapter_loads: int
    preemptions: int
    # (time, {client: weighted service so far}) after every step, for fairness checks
    service_trace: list[tuple[float, dict]]
    step_rows: list[int]       # decode rows and prompt chunks, per step
    step_adapters: list[int]   # distinct adapters among them, per step
    step_tokens: list[int]     # decode rows and prompt tokens, per step
    launched: list[int]        # the rows each step launched (its bucket, with buckets given)

    @property
    def padding_share(self) -> float:
        """Launched rows that are padding: the bucket over the rows' whole tiles, and those tiles' own."""
        return 1 - sum(self.step_tokens) / max(1, sum(self.launched))


class Simulator:
    def __init__(self, policy: Policy, *, num_blocks: int = 4096, max_batch: int = 64,
                 max_num_batched_tokens: int = 4096, cost: StepCost = StepCost(), adapter_pages: int = 64,
                 max_adapters: int = 64, service_weights: tuple[float, float] = (1.0, 2.0), partition=None,
                 targets=(), max_blocks: int | None = None, buckets: tuple[tuple[int, ...], ...] | None = None,
                 fit_from: int | None = None, kv_pages: int = 2):
        """partition, targets: the residency's page tables (a LoraPartition; none by default: the policies
        need no tables, benchmarks/host_step.py times building a step's batch from them); max_blocks: the
        scheduler's block tables' width (Scheduler's; none kept by default). buckets: the decode-only and the
        step row counts (jslora.scheduler.rows; None: a step launches its rows' whole tiles); fit_from: the
        scheduler cuts chunks to fit them from this many rows (EngineConfig.fit_chunks_from). kv_pages: pages
        a token's K and V take (2; 1 for an FP8 cache: EngineConfig.kv_pages_per_token)."""
        self.now = 0.0
        self.cost, self.adapter_pages, self.service_weights = cost, adapter_pages, service_weights
        self.allocator = BlockAllocator(num_blocks, 16)
        self.residency = AdapterResidency(self.allocator, max_adapters, partition, targets)
        self._loads_this_step = 0
        self.buckets = buckets
        self.scheduler = Scheduler(self.allocator, self.residency, max_batch=max_batch,
                                   max_num_batched_tokens=max_num_batched_tokens, policy=policy,
                                   load_adapter=self._load_adapter, clock=lambda: self.now, max_blocks=max_blocks,
                                   step_buckets=buckets[1] if buckets else None, fit_from=fit_from or 0,
                                   kv_pages=kv_pages)
        self._adapters: dict[str, SimAdapter] = {}
        self._uids = itertools.count(1)

    def _load_adapter(self, request: Request, extra_blocks: int) -> bool:
        need = self.residency.blocks_for_pages(request.adapter.num_pages) + extra_blocks
        if not self.residency.make_room(need, need_slot=True):
            return False
        self.residency.install(request.adapter.uid, {}, request.adapter.num_pages)
        self._loads_this_step += 1
        return True

    def schedule(self):
        """One step's plan (a subclass may time it, or build the step's batch from it)."""
        return self.scheduler.schedule()

    def adapter(self, name: str | None) -> SimAdapter | None:
        if name is None:
            return None
        if name not in self._adapters:
            self._adapters[name] = SimAdapter(name, next(self._uids), self.adapter_pages)
        return self._adapters[name]

    def run(self, trace, horizon: float | None = None) -> SimResult:
        """trace: TraceRequest-like items (arrival, adapter, prompt_len, output_len, client). Runs until
        every request has finished or been dropped (or the clock passes `horizon`)."""
        pending = sorted(trace, key=lambda t: t.arrival)
        requests, cursor = [], 0
        service: dict = {}
        service_trace, step_rows, step_adapters, step_tokens, launched = [], [], [], [], []
        w_in, w_out = self.service_weights
        while cursor < len(pending) or self.scheduler.has_work():
            if horizon is not None and self.now > horizon:
                break
            while cursor < len(pending) and pending[cursor].arrival <= self.now:
                t = pending[cursor]
                request = Request(f"sim-{cursor}", [1] * t.prompt_len, SamplingParams(max_tokens=t.output_len,
                                  ignore_eos=True), self.adapter(t.adapter), seed=0, arrival=t.arrival,
                                  client=t.client or t.adapter)
                self.scheduler.add(request)
                requests.append(request)
                cursor += 1
            self._loads_this_step = 0
            plan = self.schedule()
            for request, reason in plan.dropped:
                request.finish_reason, request.error = "abort", reason
                self.scheduler.finish(request)
            if not plan:
                if cursor < len(pending):
                    self.now = max(self.now, pending[cursor].arrival)
                    continue
                if not self.scheduler.has_work():
                    break
                raise RuntimeError("the scheduler made no progress with work queued (a request can never fit)")
            prefill_tokens = sum(c.length for c in plan.chunks)
            lengths = [c.length for c in plan.chunks]
            rows = (launched_rows(len(plan.decode), lengths, *self.buckets, self.scheduler.prefill_tile)
                    if self.buckets else step_rows_of(len(plan.decode), lengths, self.scheduler.prefill_tile))
            context = sum(r.num_computed + 1 for r in plan.decode)
            self.now += self.cost.step_seconds(prefill_tokens, len(plan.decode), self._loads_this_step,
                                               plan.num_adapters, rows, context)
            step_rows.append(len(plan.decode) + len(plan.chunks))
            step_adapters.append(plan.num_adapters)
            step_tokens.append(len(plan.decode) + prefill_tokens)
            launched.append(rows)
            sampled = [c.request for c in plan.chunks if c.is_last]
            for c in plan.chunks:
                c.request.num_computed = c.start + c.length
                service[c.request.client] = service.get(c.request.client, 0.0) + w_in * c.length
            for r in plan.decode:
                r.num_computed += 1
            for r in sampled + plan.decode:
                r.first_token_time = r.first_token_time or self.now
                r.generated.append(1)
                self.scheduler.on_token(r, self.now)
                service[r.client] = service.get(r.client, 0.0) + w_out
                if len(r.generated) >= r.sampling.max_tokens:
                    r.finish_reason, r.finish_time = "length", self.now
                    self.scheduler.finish(r)
            service_trace.append((self.now, dict(service)))
        return SimResult(requests, self.now, self.residency.loads, self.scheduler.num_preemptions, service_trace,
                         step_rows, step_adapters, step_tokens, launched)


def slo_attainment(requests: list[Request], slo_s: float) -> float:
    """Share of all requests whose first token came within slo_s of arrival (dropped ones missed)."""
    met = sum(r.first_token_time is not None and r.first_token_time - r.arrival <= slo_s for r in requests)
    return met / max(1, len(requests))

