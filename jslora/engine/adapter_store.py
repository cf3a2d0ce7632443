"""Adapters in three tiers: GPU pool pages <- host RAM <- disk.

Registration validates an adapter (a PEFT directory, a LoraAdapter, or "dummy:<rank>[:targets]",
regenerated from its seed on demand) and gives it a fresh uid, so a replacement under the same name
never reuses the old one's pages or host copy. The host tier holds each adapter already laid out as
pool rows (A transposed, scale folded into B, in the pool's dtype), ready for one copy into its pages;
it is an LRU under a byte budget, refilled from the source on demand or by a background prefetch.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import threading
import zlib

import jax
import numpy as np

from jslora.config import LORA_TARGETS, ModelConfig
from jslora.engine.adapter_reader import ProcessAdapterReader, pack_adapter, read_and_pack
from jslora.loading.peft_adapter import (
    AdapterError,
    LoraAdapter,
    check_finite_weights,
    dummy_adapter,
    load_peft_adapter,
    peft_adapter_ranks,
)
from jslora.parallel.lora_partition import LoraPartition


def load_adapter_spec(spec, cfg: ModelConfig, max_rank: int, name: str, dtype=np.float32) -> LoraAdapter:
    """A PEFT directory, a LoraAdapter, or "dummy:<rank>[:<targets comma-separated>]" (random). dtype: a
    PEFT directory's weights are read into it (the host tier's, so packing is a plain copy)."""
    if isinstance(spec, LoraAdapter):
        if spec.rank > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {spec.rank} is above max_lora_rank {max_rank}")
        for target, (a, b) in spec.weights.items():
            check_finite_weights(f"adapter {name!r}: {target}", a, b)
        return dataclasses.replace(spec, name=name)
    spec = str(spec)
    if spec.startswith("dummy:"):
        rank, targets = parse_dummy_spec(spec, name, max_rank)
        seed = zlib.crc32(name.encode())  # stable across processes, unlike hash()
        return dummy_adapter(cfg, rank, targets, seed=seed, name=name)
    return load_peft_adapter(spec, cfg, max_rank, name=name, dtype=dtype)


def parse_dummy_spec(spec: str, name: str, max_rank: int) -> tuple[int, tuple[str, ...]]:
    parts = spec.split(":")
    try:
        rank = int(parts[1])
    except (ValueError, IndexError):
        raise AdapterError(f"dummy adapter {name!r}: expected dummy:<rank>[:<targets>], got {spec!r}") from None
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"dummy adapter {name!r}: rank {rank} is outside [1, max_lora_rank={max_rank}]")
    targets = tuple(parts[2].split(",")) if len(parts) > 2 else ("q", "k", "v", "o")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise AdapterError(f"dummy adapter {name!r}: targets {bad} are not among {LORA_TARGETS}")
    return rank, targets


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter version."""
    name: str
    uid: int
    source: object
    ranks: tuple[tuple[str, int], ...]  # (target, rank) pairs
    num_pages: int

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.ranks)


def host_tier_memory(kind: str, device) -> jax.sharding.Sharding | None:
    """Where the host tier keeps adapters (EngineConfig.host_adapter_memory): the device's pinned host
    memory ("pinned"), or None for pageable NumPy arrays ("pageable", the default). On the H200 a pinned
    adapter copies 5x faster alone (0.67 vs 3.3 ms for Llama-7B rank 8), but in the engine its copy waited
    ~30 ms inside device_put and filling pinned memory ran at 0.8 GB/s (benchmarks/RESULTS.md, thirteenth
    session)."""
    if kind == "pageable":
        return None
    if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
        raise ValueError(f"host_adapter_memory='pinned': {device.platform} device {device.id} has no "
                         "pinned host memory")
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


@dataclasses.dataclass
class HostAdapter:
    """An adapter laid out as pool rows: page_data [L, n, W] (NumPy, or a jax.Array in pinned host
    memory), its num_pages rows then zeros up to a power of two n (adapter_copy_pages); index[target] =
    (a, b) tables of local page numbers ([chunks, r] each)."""
    page_data: np.ndarray | jax.Array
    index: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return self.page_data.nbytes


class AdapterStore:
    def __init__(self, cfg: ModelConfig, partition: LoraPartition, max_rank: int, dtype, host_bytes: int,
                 allowed_targets: tuple[str, ...] | None = None, load_workers: int = 4,
                 max_host_adapters: int | None = None, host_memory: jax.sharding.Sharding | None = None,
                 load_processes: int = 0):
        """partition: how adapters are laid on pool pages (split over devices under tensor parallelism);
        max_rank: the largest rank an adapter may have; the host tier holds at most host_bytes and
        max_host_adapters adapters (LRU), in host_memory (host_tier_memory; None: NumPy). load_workers
        threads read adapters into it; load_processes > 0: they hand the reading and packing to that many
        worker processes (adapter_reader.ProcessAdapterReader), so it never holds this process's GIL."""
        self.cfg, self.partition, self.max_rank = cfg, partition, max_rank
        self.allowed_targets = allowed_targets
        self.dtype = np.dtype(dtype)
        self.host_bytes, self.max_host_adapters = host_bytes, max_host_adapters
        self.host_memory = host_memory
        self._entries: dict[str, AdapterEntry] = {}
        self._host: collections.OrderedDict[int, HostAdapter] = collections.OrderedDict()
        self._loading: dict[int, concurrent.futures.Future] = {}
        self._load_errors: dict[int, str] = {}  # uid -> why its source could not be read again
        self._uids = itertools.count(1)
        self._lock = threading.RLock()
        self._executor = concurrent.futures.ThreadPoolExecutor(load_workers, thread_name_prefix="adapter-prefetch")
        self._reader = (ProcessAdapterReader(cfg, partition, max_rank, self.dtype, load_processes)
                        if load_processes else None)
        self._host_used = 0
        self.source_loads = 0      # reads from disk (or regenerations of dummy adapters)
        self.host_evictions = 0

    # -- registry --------------------------------------------------------------------------------
    def register(self, name: str, source, lazy: bool = False) -> tuple[AdapterEntry, AdapterEntry | None]:
        """Validate and register; returns (new entry, the entry it replaced or None). A dummy adapter
        ("dummy:<rank>[:targets]") is only parsed here: its weights are made when first used, so
        thousands register at once. lazy: a PEFT directory is checked as far as its config and its
        file's header go, and its weights are read when first used (thousands of adapters on disk
        register in seconds, not in one read of them all; a bad weight then fails its requests only)."""
        if isinstance(source, str) and source.startswith("dummy:"):
            rank, targets = parse_dummy_spec(source, name, self.max_rank)
            ranks, host = tuple((t, rank) for t in LORA_TARGETS if t in targets), None
        elif lazy and isinstance(source, (str, os.PathLike)):
            ranks, host = tuple(peft_adapter_ranks(source, self.cfg, self.max_rank).items()), None
        else:
            adapter = load_adapter_spec(source, self.cfg, self.max_rank, name, self.dtype)
            host = self._pack(adapter)
            ranks = tuple((t, a.shape[-1]) for t, (a, _) in adapter.weights.items())
        extra = {t for t, _ in ranks} - set(self.allowed_targets or [t for t, _ in ranks])
        if extra:
            raise AdapterError(f"adapter {name!r} targets {sorted(extra)}, but this engine serves LoRA on "
                               f"{list(self.allowed_targets)} only (lora_targets)")
        num_pages = self.partition.pages_needed(dict(ranks))
        with self._lock:
            entry = AdapterEntry(name, next(self._uids), source, ranks, num_pages)
            old = self._entries.get(name)
            if old is not None:
                self._drop_host(old.uid)
                self._load_errors.pop(old.uid, None)
            self._entries[name] = entry
            if host is not None:
                self._put_host(entry.uid, host)
        return entry, old

    def unregister(self, name: str) -> AdapterEntry:
        with self._lock:
            if name not in self._entries:
                raise KeyError(f"unknown adapter {name!r}")
            entry = self._entries.pop(name)
            self._drop_host(entry.uid)
            self._load_errors.pop(entry.uid, None)
            return entry

    def get(self, name: str) -> AdapterEntry:
        with self._lock:
            if name not in self._entries:
                raise KeyError(f"unknown adapter {name!r}; registered: {sorted(self._entries)[:20]}")
            return self._entries[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- host tier -------------------------------------------------------------------------------
    def host_copy(self, entry: AdapterEntry) -> HostAdapter:
        """The adapter's pool rows, from host RAM, from a prefetch in progress, or read now."""
        with self._lock:
            if entry.uid in self._host:
                self._host.move_to_end(entry.uid)
                return self._host[entry.uid]
            future = self._loading.get(entry.uid)
        if future is not None:
            return future.result()
        return self._load(entry)

    def drop_host_copy(self, entry: AdapterEntry) -> None:
        """Forget the adapter's host copy (the next use reads its source again)."""
        with self._lock:
            self._drop_host(entry.uid)

    def is_on_host(self, entry: AdapterEntry) -> bool:
        with self._lock:
            return entry.uid in self._host

    def prefetch(self, entry: AdapterEntry) -> None:
        """Start reading the adapter into host RAM in the background (no-op if there or on its way)."""
        with self._lock:
            if entry.uid in self._host or entry.uid in self._loading:
                return
            self._loading[entry.uid] = self._executor.submit(self._load, entry)

    def preload(self, names: list[str], workers: int = 8) -> int:
        """Read adapters into host RAM up front, in parallel, while they fit in the host budget (a
        server that keeps its adapters in host memory, as S-LoRA does). Returns how many are there."""
        entries = [self.get(n) for n in names]
        local = self.partition.local_layout  # a host copy holds every device's columns of a page
        page_bytes = local.num_layers * local.page_width * self.partition.tp * self.dtype.itemsize
        per = {e.uid: e.num_pages * page_bytes for e in entries}
        chosen, total = [], self._host_used
        for e in entries:
            if total + per[e.uid] > self.host_bytes:
                break
            chosen.append(e)
            total += per[e.uid]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda e: self.is_on_host(e) or self._load(e), chosen))
        return sum(self.is_on_host(e) for e in entries)

    @property
    def host_resident(self) -> int:
        return len(self._host)

    def load_error(self, entry: AdapterEntry) -> str | None:
        """Why the adapter's source failed its last read (changed or removed since it was registered)."""
        with self._lock:
            return self._load_errors.get(entry.uid)

    def _load(self, entry: AdapterEntry) -> HostAdapter:
        try:
            try:
                host = self._read(entry)
            except Exception as e:
                with self._lock:
                    self._load_errors[entry.uid] = f"{type(e).__name__}: {e}"
                raise
            with self._lock:
                self.source_loads += 1
                if self._entries.get(entry.name) is entry:  # not unregistered or replaced meanwhile
                    self._put_host(entry.uid, host)
            return host
        finally:
            with self._lock:
                self._loading.pop(entry.uid, None)

    def _read(self, entry: AdapterEntry) -> HostAdapter:
        """The entry's source read and packed (in a worker process when there are some and the source is
        a path or a dummy spec; an adapter given as arrays is packed here)."""
        if self._reader is not None and isinstance(entry.source, (str, os.PathLike)):
            return self._host_adapter(*self._reader.read(entry.source, entry.name))
        return self._host_adapter(*read_and_pack(entry.source, entry.name, self.cfg, self.partition, self.max_rank,
                                                 self.dtype))

    def _pack(self, adapter: LoraAdapter) -> HostAdapter:
        return self._host_adapter(*pack_adapter(adapter, self.partition, self.dtype))

    def _host_adapter(self, padded: np.ndarray, index: dict) -> HostAdapter:
        if self.host_memory is not None:  # pinned now, on the loading thread, so no later copy waits for it
            return HostAdapter(jax.device_put(padded, self.host_memory).block_until_ready(), index)
        return HostAdapter(padded, index)

    def _put_host(self, uid: int, host: HostAdapter) -> None:
        self._drop_host(uid)
        self._host[uid] = host
        self._host_used += host.nbytes
        while len(self._host) > 1 and (self._host_used > self.host_bytes or len(self._host) > (
                self.max_host_adapters or len(self._host))):
            self._drop_host(next(iter(self._host)))
            self.host_evictions += 1

    def _drop_host(self, uid: int) -> None:
        host = self._host.pop(uid, None)
        if host is not None:
            self._host_used -= host.nbytes

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._reader is not None:
            self._reader.close()
