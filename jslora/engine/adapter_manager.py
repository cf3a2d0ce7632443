"""Adapters between their tiers for the engine: the host store (disk -> host RAM), residency in the GPU
pool (LRU), host -> device staging, prefetch of queued requests' adapters, and readiness. It is the
scheduler's one collaborator: `ready` and `load` are the scheduler's two callbacks.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
from collections.abc import Callable

import jax

from jslora.config import LORA_TARGETS, ModelConfig
from jslora.engine.adapter_store import AdapterEntry, AdapterStore, host_tier_memory
from jslora.engine.config import EngineConfig
from jslora.engine.model_runner import ModelRunner
from jslora.loading.peft_adapter import AdapterError
from jslora.memory import AdapterResidency, BlockAllocator
from jslora.parallel.lora_partition import LoraPartition
from jslora.request import Request


def adapter_load_processes(config: EngineConfig) -> int:
    """EngineConfig.adapter_load_processes, None resolved: 8 on a GPU (at most half its host's cores; the
    loader threads become as many), 0 elsewhere."""
    if config.adapter_load_processes is not None:
        return config.adapter_load_processes
    return min(8, (os.cpu_count() or 2) // 2) if jax.default_backend() == "gpu" else 0


class AdapterManager:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, runner: ModelRunner,
                 allocator: BlockAllocator, max_lora_rank: int, busy: Callable[[], bool], unified_pool: bool = True):
        """allocator: the blocks adapters take; unified_pool: it is the KV cache's too (S-LoRA's unified
        pool) rather than blocks of the adapters' own (the no-unified baseline's); busy(): whether the
        device has work to overlap a disk read with."""
        self.config, self.runner, self.busy, self.unified_pool = config, runner, busy, unified_pool
        self.partition = LoraPartition(model_config, runner.layout, config.tensor_parallel_size, max_lora_rank)
        self.residency = AdapterResidency(allocator, config.max_adapters, self.partition, LORA_TARGETS)
        processes = adapter_load_processes(config)
        self.store = AdapterStore(model_config, self.partition, config.max_lora_rank, runner.dtype,
                                  config.host_adapter_bytes, allowed_targets=config.lora_targets,
                                  load_workers=max(config.adapter_load_workers, processes), load_processes=processes,
                                  max_host_adapters=config.max_host_adapters,
                                  host_memory=host_tier_memory(config.host_adapter_memory, jax.devices()[0]))
        # host -> device copies of adapters about to be installed (uid -> future of the device rows)
        self._stager = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-stage")
        self._staged: collections.OrderedDict[int, concurrent.futures.Future] = collections.OrderedDict()
        # requests whose adapter could not be read (request_id -> (request, why)): failed after scheduling
        self._unservable: dict[str, tuple[Request, str]] = {}

    # -- registry (thread-safe) ------------------------------------------------------------------
    def register(self, name: str, source, lazy: bool = False) -> tuple[AdapterEntry, AdapterEntry | None]:
        return self.store.register(name, source, lazy)

    def unregister(self, name: str) -> AdapterEntry:
        return self.store.unregister(name)

    def on_registered(self, entry: AdapterEntry | None, old: AdapterEntry | None) -> None:
        """On the engine thread: the old version leaves the pool (when its last request finishes); the
        steps compute LoRA on the new one's targets too."""
        if old is not None:
            self.residency.retire(old.uid)
        if entry is not None:
            self.runner.add_targets(entry.targets)

    # -- the scheduler's callbacks ---------------------------------------------------------------
    def ready(self, request: Request) -> bool:
        """False while the request's adapter is still on its way from disk, or from host RAM to the
        device, and other requests keep the device busy: the scheduler then admits the requests behind
        it rather than wait."""
        entry = request.adapter
        if entry is None or self.residency.get(entry.uid) is not None:
            return True
        error = self.store.load_error(entry)
        if error is not None:  # its file went bad after registration: fail it, not the queue
            self._unservable[request.request_id] = (request, error)
            return False
        if not self.busy():
            return True  # nothing to overlap a read or copy with: load() makes it now
        if self.store.is_on_host(entry):
            # its host -> device copy runs on the stager thread; admitting the request before the copy is
            # done would block the step loop on it in load(): the likely cause of the GPU's 4% idle time at
            # S1 with 2000 adapters (~0.7 copies a step, each about a step long)
            staged = self._staged.get(entry.uid)
            if staged is None:
                if sum(not f.done() for f in self._staged.values()) >= max(1, self.config.prefetch_depth):
                    return False  # the copies of requests ahead of it come first
                self._stage(entry)
                staged = self._staged.get(entry.uid)
            return staged is None or staged.done()
        self.store.prefetch(entry)
        return False

    def load(self, request: Request, extra_blocks: int) -> bool:
        """Install the request's adapter in the pool, keeping extra_blocks free (the scheduler admits it next)."""
        entry = request.adapter
        if not self.unified_pool:
            extra_blocks = 0  # KV lives elsewhere
        if not self.residency.make_room(self.residency.blocks_for_pages(entry.num_pages) + extra_blocks,
                                        need_slot=True):
            return False
        try:
            host = self.store.host_copy(entry)
        except (AdapterError, OSError, ValueError) as e:
            self._unservable[request.request_id] = (request, self.store.load_error(entry) or str(e))
            return False
        self._install(entry, host)
        return True

    def take_unservable(self) -> list[tuple[Request, str]]:
        """Requests whose adapter could not be read since the last call, with why."""
        out, self._unservable = list(self._unservable.values()), {}
        return out

    # -- prefetch --------------------------------------------------------------------------------
    def prefetch(self, waiting: list[Request], spare_blocks: int) -> None:
        """Start loading the adapters of the next queued requests (in admission order): disk -> host in
        a thread, and host -> pool pages (an async device copy) while spare_blocks allow without
        evicting. In the unified pool each request's own KV blocks come out of the spare first."""
        for request in itertools.islice(waiting, self.config.prefetch_depth):
            if self.unified_pool:
                spare_blocks -= self.config.kv_pages_per_token * self.residency.allocator.blocks_for(
                    len(request.all_ids))
            entry = request.adapter
            if entry is None or self.residency.get(entry.uid) is not None or self.store.load_error(entry):
                continue
            if not self.store.is_on_host(entry):
                self.store.prefetch(entry)
                continue
            self._stage(entry)
            staged = self._staged.get(entry.uid)
            if staged is not None and not staged.done():
                continue  # still on its way to the device: installed by a later step, not waited for here
            need = self.residency.blocks_for_pages(entry.num_pages)
            if need <= spare_blocks and self.residency.free_slots:
                self._install(entry, self.store.host_copy(entry))
                spare_blocks -= need

    def _stage(self, entry: AdapterEntry) -> None:
        """Start the host -> device copy of an adapter about to be installed, on a worker thread, so
        the step loop does not pay for padding and transferring hundreds of MB."""
        if entry.uid in self._staged:
            return
        self._staged[entry.uid] = self._stager.submit(self._rows_on_device, self.store.host_copy(entry).page_data)
        while len(self._staged) > self.config.prefetch_depth:  # bounded device memory outside the pool
            self._staged.popitem(last=False)

    def _rows_on_device(self, page_data) -> jax.Array:
        """(Stager thread) the adapter's rows, returned once they are on the device: device_put returns
        while the host -> device transfer may still run, and a step that wrote them into the pool would
        then wait for it on the GPU, so a staged copy counts as done only when it has landed."""
        return jax.block_until_ready(self.runner.adapter_rows(page_data))

    def _install(self, entry: AdapterEntry, host) -> None:
        _, pages = self.residency.install(entry.uid, host.index, entry.num_pages)
        staged = self._staged.pop(entry.uid, None)
        rows: jax.Array = staged.result() if staged is not None else self.runner.adapter_rows(host.page_data)
        self.runner.write_adapter(pages, rows)

    def evict_all(self) -> None:
        """Drop every idle adapter from the pool (after the pool was lost)."""
        self.residency.make_room(self.residency.allocator.capacity)

    def close(self) -> None:
        self.store.close()
        self._stager.shutdown(wait=False)
