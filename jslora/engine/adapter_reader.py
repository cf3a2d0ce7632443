"""Reading an adapter's source into pool rows: in the calling thread, or in worker processes.

An adapter read from disk is parsed, scaled, checked and packed into pool rows by NumPy operations,
each of which may release the GIL and must then win it back from the engine loop; with thousands of
adapters on disk (S1 at 10,000) the loader threads and the engine loop shared one GIL and the loop's
host time per step doubled (benchmarks/RESULTS.md, fourteenth session). `ProcessAdapterReader` does the
whole read in worker processes: the engine process only waits for the worker (no GIL held) and reads
the packed rows back from the worker's scratch file in one read call (the GIL released once, for the
copy).
"""
from __future__ import annotations

import itertools
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

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
    """Where workers hand packed rows back (a file per worker, rewritten at each read, removed when the
    worker ends): /dev/shm (memory) when it has room, else the temp dir."""
    try:
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize >= 2 << 30 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


# -- worker side ------------------------------------------------------------------------------
def _serve(conn, scratch: str) -> None:
    """A worker's loop: its settings (cfg, partition, max_rank, dtype) first, then (source, name) in,
    the packed rows written to `scratch` and (shape, index) or the exception out, until the pipe closes."""
    cfg, partition, max_rank, dtype = conn.recv()
    while True:
        try:
            source, name = conn.recv()
        except EOFError:  # the reader closed, or the engine process died: leave no file behind
            try:
                os.unlink(scratch)
            except FileNotFoundError:
                pass
            return
        try:
            page_data, index = read_and_pack(source, name, cfg, partition, max_rank, dtype)
            with open(scratch, "wb", buffering=0) as f:
                f.write(memoryview(page_data.view(np.uint8).reshape(-1)))
            reply = (page_data.shape, index)
        except Exception as e:  # the tenant's error goes back to the read that asked
            reply = e
            try:
                pickle.dumps(e)
            except Exception:
                reply = AdapterError(f"adapter {name!r}: {type(e).__name__}: {e}")
        conn.send(reply)


def _read_exact(path: str, out: np.ndarray) -> None:
    buffer = memoryview(out.view(np.uint8).reshape(-1))
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(buffer):  # one call for any adapter under 2 GB
            n = f.readinto(buffer[done:])
            if not n:
                raise OSError(f"{path}: {done} of {len(buffer)} bytes")
            done += n


class _Duplex:
    """Two one-way connections as one (os.pipe is one-way)."""

    def __init__(self, reader: Connection, writer: Connection):
        self.recv, self.send = reader.recv, writer.send


class _Worker:
    """A fresh interpreter running worker_main, with a pipe each way: not
    multiprocessing's spawn, which would run the engine's __main__ script again in the worker (a user's
    script without a main guard would build a second engine there)."""

    def __init__(self, scratch: str, args: tuple):
        self.scratch = scratch
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        # a worker never touches the GPU; it imports this package from where the engine did
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from jslora.engine.adapter_reader import worker_main; "
             "worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])", str(child_reads), str(child_writes),
             scratch],
            pass_fds=(child_reads, child_writes), env=env, stdin=subprocess.DEVNULL)
        os.close(child_reads)
        os.close(child_writes)
        self._writer = Connection(parent_writes, readable=False)
        self._reader = Connection(parent_reads, writable=False)
        self.send(args)

    def send(self, message) -> None:
        self._writer.send(message)

    def recv(self):
        return self._reader.recv()

    def hang_up(self) -> None:
        """Close the pipe to the worker: its EOF, on which it removes its file and exits (as when the
        engine process dies)."""
        self._writer.close()

    def stop(self) -> None:
        self.hang_up()
        self._reader.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:
            os.unlink(self.scratch)
        except FileNotFoundError:
            pass


class ProcessAdapterReader:
    """read_and_pack in up to `processes` worker interpreters, started on demand (afresh, not forked: the
    engine process has threads and a GPU context), each with its own pipes and scratch file. A reading
    thread takes an idle worker, sends it the source and blocks on its reply: a read costs this process's
    GIL a few hand-overs (send, the reply, the copy back), not a pool's manager and feeder threads' too.
    A worker that dies (a crash, the OOM killer) is replaced and the read retried once, so one bad file
    costs its own requests only."""

    def __init__(self, cfg: ModelConfig, partition: LoraPartition, max_rank: int, dtype, processes: int):
        self.dtype = np.dtype(dtype)
        self._args = (cfg, partition, max_rank, self.dtype)
        self._scratch = scratch_dir()
        self.processes = processes
        self._names = itertools.count()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._started = 0  # workers start on demand, up to `processes`: an engine that reads nothing runs none

    def _new_worker(self) -> _Worker:
        path = os.path.join(self._scratch, f"jslora-adapter-{os.getpid()}-{next(self._names)}.bin")
        return _Worker(path, self._args)

    def _take_worker(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                start = self._started < self.processes
                self._started += start
            return self._new_worker() if start else self._idle.get()

    def read(self, source, name: str) -> tuple[np.ndarray, dict]:
        worker = self._take_worker()
        try:
            for attempt in range(2):
                try:
                    worker.send((source, name))
                    reply = worker.recv()
                    break
                except (EOFError, OSError) as e:  # it died: a fresh one takes its place
                    worker.stop()
                    worker = self._new_worker()
                    if attempt:
                        raise AdapterError(f"adapter {name!r}: its reader process died twice ({e!r})") from None
            if isinstance(reply, BaseException):
                raise reply
            shape, index = reply
            out = np.empty(shape, self.dtype)
            _read_exact(worker.scratch, out)
            return out, index
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                return


def worker_main(read_fd: int, write_fd: int, scratch: str) -> None:
    """A worker interpreter's entry (_Worker starts it)."""
    _serve(_Duplex(Connection(read_fd, writable=False), Connection(write_fd, readable=False)), scratch)
