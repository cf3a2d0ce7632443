"""Reading an adapter's source into pool rows: in the calling thread, or in worker processes.

An adapter read from disk is parsed, scaled, checked and packed into pool rows by NumPy operations,
each of which may release the GIL and must then win it back from the engine loop; with thousands of
adapters on disk (S1 at 10,000) the loader threads and the engine loop shared one GIL and the loop's
host time per step doubled (benchmarks/RESULTS.md, fourteenth session). `ProcessAdapterReader` does the
whole read in worker processes: the engine process only waits for the worker (no GIL held) and reads
the packed rows back from a scratch file in one read call (the GIL released once, for the copy).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import tempfile
import threading
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from jslora.config import ModelConfig
from jslora.engine.sizes import adapter_copy_pages
from jslora.loading.peft_adapter import AdapterError, LoraAdapter
from jslora.parallel.lora_partition import LoraPartition


def pack_adapter(adapter: LoraAdapter, partition: LoraPartition, dtype) -> tuple[np.ndarray, dict]:
    """The adapter laid out as pool rows: (page_data [L, n, tp * W] in dtype, its pages then zeros up to
    a power of two n (adapter_copy_pages), so no copy to the pool repacks it; index[target] = (a, b)
    tables of local page numbers)."""
    ranks = {t: a.shape[-1] for t, (a, _) in adapter.weights.items()}
    pages = np.arange(partition.pages_needed(ranks), dtype=np.int32)
    local = partition.local_layout
    padded = np.zeros((local.num_layers, adapter_copy_pages(len(pages)), partition.tp * local.page_width), dtype)
    _, index = partition.pack(adapter.weights, pages, out=padded)
    return padded, index


def read_and_pack(source, name: str, cfg: ModelConfig, partition: LoraPartition, max_rank: int,
                  dtype) -> tuple[np.ndarray, dict]:
    """A PEFT directory, "dummy:..." spec or LoraAdapter, read and packed in the calling thread."""
    from jslora.engine.adapter_store import load_adapter_spec  # the store imports this module
    return pack_adapter(load_adapter_spec(source, cfg, max_rank, name, dtype), partition, dtype)


def scratch_dir() -> str:
    """Where workers hand packed rows back: /dev/shm (memory) when it has room, else the temp dir (its
    files are deleted as soon as read, so their pages are rarely written out)."""
    try:
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize >= 2 << 30 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


# -- worker side (one per process, set by the pool's initializer) ---------------------------------
_worker_args: tuple | None = None


def _init_worker(cfg, partition, max_rank, dtype) -> None:
    global _worker_args
    os.environ["JAX_PLATFORMS"] = "cpu"  # a worker never touches the GPU, should anything import jax
    _worker_args = (cfg, partition, max_rank, dtype)


def _read_to_file(source, name: str, path: str) -> tuple[tuple[int, ...], dict]:
    page_data, index = read_and_pack(source, name, *_worker_args)
    with open(path, "wb", buffering=0) as f:
        f.write(memoryview(page_data.view(np.uint8).reshape(-1)))
    return page_data.shape, index


def _read_exact(path: str, out: np.ndarray) -> None:
    buffer = memoryview(out.view(np.uint8).reshape(-1))
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(buffer):  # one call for any adapter under 2 GB
            n = f.readinto(buffer[done:])
            if not n:
                raise OSError(f"{path}: {done} of {len(buffer)} bytes")
            done += n


class ProcessAdapterReader:
    """read_and_pack in `processes` spawned workers (spawned, not forked: the engine process has
    threads and a GPU context). A worker that dies (a crash, the OOM killer) fails the reads it had in
    flight; each is retried once in a fresh pool, so one bad file costs its own requests only."""

    def __init__(self, cfg: ModelConfig, partition: LoraPartition, max_rank: int, dtype, processes: int):
        self.dtype = np.dtype(dtype)
        self._init_args = (cfg, partition, max_rank, self.dtype)
        self.processes = processes
        self._scratch = scratch_dir()
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=self._init_args)

    def read(self, source, name: str) -> tuple[np.ndarray, dict]:
        path = os.path.join(self._scratch, f"jslora-adapter-{os.getpid()}-{next(self._names)}.bin")
        try:
            for attempt in range(2):
                with self._lock:
                    pool = self._pool
                try:
                    shape, index = pool.submit(_read_to_file, source, name, path).result()
                    break
                except BrokenProcessPool as e:
                    with self._lock:
                        if self._pool is pool:  # the first reader to see it replaces it
                            self._pool = self._new_pool()
                    if attempt:
                        raise AdapterError(f"adapter {name!r}: its reader process died twice ({e})") from None
            out = np.empty(shape, self.dtype)
            _read_exact(path, out)
            return out, index
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
