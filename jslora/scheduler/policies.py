"""Admission policies. A policy orders the waiting queue (the scheduler admits in that order while
memory, batch slots and the prefill token budget allow, stopping at the first request that does not
fit, so a large request is not starved by smaller ones behind it) and may drop queued requests.

  fcfs         first come, first served.
  newest       newest first (last come, first served): under overload the requests that can still
               meet a first-token SLO are the recent ones.
  slo-abort    S-LoRA's early abort: drop a queued request that can no longer get its first token
               within the SLO, serve the rest first come, first served, newest first under overload.
  vtc          Virtual Token Counter fair scheduling (Sheng et al., "Fairness in Serving Large Language
               Models"): per client, a counter of weighted service; the backlogged client with the
               smallest counter goes next.
  adapter-aware  wraps another policy: within the first `window` requests of its order (32, or
               "adapter-aware:W"), those whose adapter a running request already uses go first (the
               step reads no new LoRA rows for them), then those whose adapter is in the pool (no
               swap), then the rest. The bound: only requests among the window may pass a request.
"""
from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterable

from jslora.request import Request


class Policy:
    name = "base"

    def bind(self, scheduler) -> None:
        """The scheduler introduces itself (policies may look at its running set and residency)."""
        self.scheduler = scheduler

    def is_resident(self, request: Request) -> bool:
        """Whether the request runs without loading an adapter (base model, or adapter in the pool)."""
        return request.adapter is None or self.scheduler.residency.get(request.adapter.uid) is not None

    def order(self, waiting: list[Request], now: float) -> Iterable[Request]:
        raise NotImplementedError

    def drop(self, waiting: list[Request], now: float) -> list[tuple[Request, str]]:
        """Queued requests to abort now, each with the reason the client is told."""
        return []

    def on_arrival(self, request: Request, waiting: list[Request], running: list[Request]) -> None:
        pass

    def on_admit(self, request: Request) -> None:
        pass

    def on_tokens(self, request: Request, num_tokens: int) -> None:
        pass

    def on_first_token(self, request: Request, now: float) -> None:
        pass


class FCFS(Policy):
    """First come, first served; preempted requests go back to the front (they arrived earlier)."""
    name = "fcfs"

    def order(self, waiting, now):
        return sorted(waiting, key=lambda r: r.arrival)


class NewestFirst(Policy):
    name = "newest"

    def order(self, waiting, now):
        return sorted(waiting, key=lambda r: -r.arrival)


class SLOAbort(Policy):
    """Early abort. A queued request is dropped once it cannot get its first token within the SLO
    even in the best case seen lately: its wait plus the shortest recent admission-to-first-token
    time passes the SLO (dropping on an average instead dropped requests that would have made it).
    While some queued request has less slack than that, the queue is overloaded and the newest
    requests go first: they have the most slack to lose."""
    name = "slo-abort"

    def __init__(self, slo_s: float = 6.0, window: int = 64):
        self.slo_s = slo_s
        self._recent: collections.deque = collections.deque(maxlen=window)  # admission -> first token

    @property
    def estimate_s(self) -> float:
        return min(self._recent, default=0.0)

    def drop(self, waiting, now):
        best = self.estimate_s
        return [(r, f"dropped by the early-abort policy: its first token could no longer arrive within the "
                    f"{self.slo_s:g} s SLO (waited {now - r.arrival:.2f} s, a first token takes at least "
                    f"{best:.2f} s)")
                for r in waiting if not r.generated and now - r.arrival + best > self.slo_s]

    def order(self, waiting, now):
        best = self.estimate_s
        overloaded = any(self.slo_s - (now - r.arrival) - best < best for r in waiting)
        return sorted(waiting, key=lambda r: -r.arrival if overloaded else r.arrival)

    def on_first_token(self, request, now):
        if request.admit_time is not None:
            self._recent.append(now - request.admit_time)


class VTC(Policy):
    """Virtual Token Counter: counter[c] grows by input_weight per prompt token when c's request is
    admitted and by output_weight per generated token; the waiting request of the client with the
    smallest counter goes first (its own requests first come, first served). A client that becomes
    backlogged is lifted to the smallest counter among the backlogged ones, so idle time earns no credit."""
    name = "vtc"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0):
        self.input_weight, self.output_weight = input_weight, output_weight
        self.counters: dict[object, float] = {}

    def on_arrival(self, request, waiting, running):
        client = request.client
        backlogged = {r.client for r in waiting} | {r.client for r in running}
        if client not in backlogged:
            others = [self.counters.get(c, 0.0) for c in backlogged]
            lifted = min(others) if others else 0.0
            self.counters[client] = max(self.counters.get(client, 0.0), lifted)

    def order(self, waiting, now):
        # lazily, as admissions would go: each one charges its client for the prompt (a heap keeps
        # this cheap with thousands of clients)
        queues: dict[object, collections.deque] = {}
        for r in sorted(waiting, key=lambda r: r.arrival):
            queues.setdefault(r.client, collections.deque()).append(r)
        heap = [(self.counters.get(c, 0.0), q[0].arrival, i, c) for i, (c, q) in enumerate(queues.items())]
        heapq.heapify(heap)
        while heap:
            counter, _, i, client = heapq.heappop(heap)
            request = queues[client].popleft()
            yield request
            if queues[client]:
                counter += self.input_weight * len(request.all_ids)
                heapq.heappush(heap, (counter, queues[client][0].arrival, i, client))

    def on_admit(self, request):
        self.counters[request.client] = self.counters.get(request.client, 0.0) + \
            self.input_weight * len(request.all_ids)

    def on_tokens(self, request, num_tokens):
        self.counters[request.client] = self.counters.get(request.client, 0.0) + self.output_weight * num_tokens


class AdapterAware(Policy):
    """Within a window of the inner policy's order: adapters already running first, then resident ones."""

    def __init__(self, inner: Policy, window: int = 32):
        if window < 1:
            raise ValueError(f"adapter-aware: the window must be positive, got {window}")
        self.inner, self.window = inner, window
        self.name = f"adapter-aware{'' if window == 32 else f':{window}'}+{inner.name}"

    def bind(self, scheduler):
        super().bind(scheduler)
        self.inner.bind(scheduler)

    def order(self, waiting, now):
        ordered = iter(self.inner.order(waiting, now))
        head = list(itertools.islice(ordered, self.window))
        running = {r.adapter.uid for r in self.scheduler.running if r.adapter is not None}

        def rank(request):  # stable: the inner order within each class
            if request.adapter is None or request.adapter.uid in running:
                return 0
            return 1 if self.is_resident(request) else 2
        return itertools.chain(sorted(head, key=rank), ordered)

    def drop(self, waiting, now):
        return self.inner.drop(waiting, now)

    def on_arrival(self, request, waiting, running):
        self.inner.on_arrival(request, waiting, running)

    def on_admit(self, request):
        self.inner.on_admit(request)

    def on_tokens(self, request, num_tokens):
        self.inner.on_tokens(request, num_tokens)

    def on_first_token(self, request, now):
        self.inner.on_first_token(request, now)


POLICIES = {"fcfs": FCFS, "newest": NewestFirst, "slo-abort": SLOAbort, "vtc": VTC}


def make_policy(name: str, **options) -> Policy:
    """A policy by name; "adapter-aware" alone wraps fcfs, "adapter-aware+vtc" wraps vtc, and so on;
    "adapter-aware:600+fcfs" looks 600 requests ahead instead of 32. options go to the inner policy
    (slo_s for slo-abort; input_weight, output_weight for vtc)."""
    if name.startswith("adapter-aware"):
        head, _, inner = name.partition("+")
        window = head.removeprefix("adapter-aware")
        if window and not (window.startswith(":") and window[1:].isdigit()):
            raise ValueError(f"unknown scheduling policy {name!r}: a window is written adapter-aware:<requests>")
        return AdapterAware(make_policy(inner or "fcfs", **options), int(window[1:]) if window else 32)
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from "
                         f"{sorted(POLICIES) + ['adapter-aware[:<window>][+<policy>]']}")
    known = {"slo-abort": {"slo_s"}, "vtc": {"input_weight", "output_weight"}}.get(name, set())
    return POLICIES[name](**{k: v for k, v in options.items() if k in known})
