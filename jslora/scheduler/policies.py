"""Admission order policies. A policy orders the waiting queue; the scheduler admits in that order
while memory, batch slots and the prefill token budget allow (stopping at the first that does not fit,
so a large request is not starved by smaller ones behind it)."""
from __future__ import annotations

from typing import Iterable

from jslora.request import Request


class FCFS:
    """First come, first served; preempted requests go back to the front (they arrived earlier)."""
    name = "fcfs"

    def order(self, waiting: list[Request], now: float) -> Iterable[Request]:
        return sorted(waiting, key=lambda r: r.arrival)

    def on_admit(self, request: Request) -> None:
        pass

    def on_tokens(self, request: Request, num_tokens: int) -> None:
        pass


POLICIES = {"fcfs": FCFS}


def make_policy(name: str, **options):
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](**options)
