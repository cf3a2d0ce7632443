"""Runs the engine loop in a background thread and hands each request's updates to asyncio.

The engine is single-threaded: HTTP handlers only queue work (add_request, abort, adapter changes
are thread-safe commands the engine applies at its next step). A launch that fails ends only its own
requests (Engine._launch_isolated); a step that fails on the device, losing the pool, fails the running
requests with an error (never a silent abort) and the loop, the queue and the server go on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from jslora.engine import Engine
from jslora.request import RequestUpdate
from jslora.sampling import SamplingParams

log = logging.getLogger("jslora.server")


class Overloaded(RuntimeError):
    pass


class EngineRunner:
    def __init__(self, engine: Engine, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self._wake = threading.Event()
        self._stop = False
        self._listeners: dict[str, callable] = {}
        self.step_errors = 0
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                self.step_errors += 1
                log.exception("engine step failed; failing the running requests, keeping the queue")
                self.engine.recover_device_state(f"internal error in an engine step: {type(e).__name__}")
                time.sleep(0.01)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, adapter: str | None,
               client: str | None = None, cache_salt: str | None = None) -> tuple[str, asyncio.Queue]:
        """Queue a request; its updates arrive on the returned asyncio queue (of this event loop)."""
        if self.engine.num_queued() >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} requests are already waiting")
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RequestUpdate] = asyncio.Queue()

        def deliver(update: RequestUpdate) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(updates.put_nowait, update)

        request = self.engine.add_request(prompt_ids, sampling, adapter, client=client, on_update=deliver,
                                          cache_salt=cache_salt)
        self._wake.set()
        return request.request_id, updates

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
