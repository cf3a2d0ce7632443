"""Adapters read in worker processes (EngineConfig.adapter_load_processes): the same pool rows as a read
in the engine's own threads, a bad file fails its own adapter only, and a worker that dies costs no
adapter its read."""
from __future__ import annotations

import os
import signal

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jslora.bench.adapter_files import write_peft_adapters
from jslora.config import ModelConfig
from jslora.engine.adapter_store import AdapterStore
from jslora.loading.peft_adapter import AdapterError
from jslora.parallel.lora_partition import LoraPartition
from pallas_kernels.pool import PoolLayout


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(cfg, adapter paths, a store reading in threads, one reading in two processes), bfloat16 pools."""
    root = tmp_path_factory.mktemp("adapters")
    cfg = ModelConfig.named("tiny")
    paths = write_peft_adapters(root, {"r8": 8, "r4": 4, "nan": 4}, cfg, progress=False)
    weights = root / "nan" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[3]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[7] = np.nan  # one weight of one layer: a tenant's broken file
    save_file(tensors, str(weights))
    partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 64, cfg.num_kv_heads * cfg.head_dim), 1, 16)
    in_threads = AdapterStore(cfg, partition, 16, ml_dtypes.bfloat16, host_bytes=1 << 30)
    in_processes = AdapterStore(cfg, partition, 16, ml_dtypes.bfloat16, host_bytes=1 << 30, load_processes=2)
    yield cfg, paths, in_threads, in_processes
    in_threads.close()
    in_processes.close()


def _read_both(stores, name, source):
    *_, in_threads, in_processes = stores
    return [store._read(store.register(name, source, lazy=True)[0]) for store in (in_threads, in_processes)]


@pytest.mark.parametrize("source", ["r8", "r4", "dummy:12:q,v,o"])
def test_a_process_read_equals_a_thread_read(stores, source):
    _, paths, *_ = stores
    by_thread, by_process = _read_both(stores, source, paths.get(source, source))
    assert by_process.page_data.dtype == ml_dtypes.bfloat16
    assert np.abs(by_thread.page_data.astype(np.float32)).max() > 0  # not a read of zeros
    np.testing.assert_array_equal(by_process.page_data.view(np.uint16), by_thread.page_data.view(np.uint16))
    assert by_process.index.keys() == by_thread.index.keys()
    for target, (a, b) in by_thread.index.items():
        np.testing.assert_array_equal(by_process.index[target][0], a)
        np.testing.assert_array_equal(by_process.index[target][1], b)


def test_a_process_read_equals_a_thread_read_under_tensor_parallelism(stores):
    """Two devices' columns in each page (LoraPartition with tp = 2): the same rows either way."""
    cfg, paths, *_ = stores
    partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 64, cfg.num_kv_heads * cfg.head_dim // 2), 2, 16)
    in_threads = AdapterStore(cfg, partition, 16, ml_dtypes.bfloat16, host_bytes=1 << 30)
    in_process = AdapterStore(cfg, partition, 16, ml_dtypes.bfloat16, host_bytes=1 << 30, load_processes=1)
    try:
        by_thread, by_process = (store._read(store.register("a", paths["r8"], lazy=True)[0])
                                 for store in (in_threads, in_process))
        assert np.abs(by_thread.page_data.astype(np.float32)).max() > 0
        np.testing.assert_array_equal(by_process.page_data.view(np.uint16), by_thread.page_data.view(np.uint16))
    finally:
        in_process.close()


def test_a_bad_file_fails_its_own_read_only(stores):
    """A NaN weight fails that adapter's read with the loader's own message, through the worker; the
    reads around it, in the same workers, succeed."""
    _, paths, _, store = stores
    good, _ = store.register("good", paths["r8"], lazy=True)
    bad, _ = store.register("bad", paths["nan"], lazy=True)
    with pytest.raises(AdapterError, match="NaN"):
        store.host_copy(bad)
    assert "NaN" in store.load_error(bad)
    assert store.host_copy(good).page_data.shape[0] == stores[0].num_layers


def test_closing_stops_the_workers_and_removes_their_files(stores):
    cfg, paths, in_threads, _ = stores
    store = AdapterStore(cfg, in_threads.partition, 16, ml_dtypes.bfloat16, host_bytes=1 << 30, load_processes=2)
    store._read(store.register("a", paths["r8"], lazy=True)[0])
    workers = list(store._reader._idle.queue)
    assert any(os.path.exists(w.scratch) for w in workers)
    store.close()
    assert not any(w.process.poll() is None or os.path.exists(w.scratch) for w in workers)


def test_a_killed_worker_costs_no_read(stores):
    """Workers killed (as the OOM killer would) between reads: each read finds its worker dead, starts
    a fresh one and returns the adapter."""
    _, paths, in_threads, store = stores
    reader = store._reader
    store._read(store.register("warm", paths["r4"], lazy=True)[0])  # the workers exist
    old = list(reader._idle.queue)
    for worker in old:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    by_thread = in_threads._read(in_threads.register("after-kill", paths["r4"], lazy=True)[0])
    for _ in old:  # every worker is dead: each of these reads replaces one
        by_process = store._read(store.register("after-kill", paths["r4"], lazy=True)[0])
        np.testing.assert_array_equal(by_process.page_data.view(np.uint16), by_thread.page_data.view(np.uint16))
    assert not {id(w) for w in reader._idle.queue} & {id(w) for w in old}
    assert all(w.process.poll() is None for w in reader._idle.queue)


def test_a_worker_whose_reader_is_gone_exits_and_removes_its_file(stores):
    """The engine process dying closes its end of each worker's pipe: the worker removes its scratch
    file and exits (no file left in /dev/shm, no orphan process)."""
    from jslora.engine.adapter_reader import ProcessAdapterReader

    cfg, paths, in_threads, _ = stores
    reader = ProcessAdapterReader(cfg, in_threads.partition, 16, ml_dtypes.bfloat16, processes=1)
    reader.read(paths["r4"], "a")
    (worker,) = list(reader._idle.queue)
    assert os.path.exists(worker.scratch)
    worker.hang_up()  # what the engine process's death does to the pipe
    assert worker.process.wait(timeout=30) == 0 and not os.path.exists(worker.scratch)


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(stores, tmp_path):
    """multiprocessing's spawn runs the parent's __main__ script again in each worker: an engine built in a
    script without `if __name__ == "__main__":` would be built again there. The workers are fresh
    interpreters: the script's body runs once, from any directory."""
    import subprocess
    import sys

    _, paths, *_ = stores
    marker = tmp_path / "runs.txt"
    script = tmp_path / "no_guard.py"
    script.write_text(f"""
import ml_dtypes
from jslora.config import ModelConfig
from jslora.engine.adapter_reader import ProcessAdapterReader
from jslora.parallel.lora_partition import LoraPartition
from pallas_kernels.pool import PoolLayout
open({str(marker)!r}, "a").write("ran\\n")
cfg = ModelConfig.named("tiny")
partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 64, cfg.num_kv_heads * cfg.head_dim), 1, 16)
reader = ProcessAdapterReader(cfg, partition, 16, ml_dtypes.bfloat16, processes=2)
rows, _ = reader.read({str(paths["r8"])!r}, "a")
assert rows.any()
reader.close()
""")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, check=True, timeout=120)
    assert marker.read_text() == "ran\n"


def test_workers_start_on_demand_up_to_the_limit(stores):
    """No worker before the first read (an engine that reads nothing runs none); six reads at once start
    at most three, which then serve them all, each read right."""
    import concurrent.futures

    from jslora.engine.adapter_reader import ProcessAdapterReader

    cfg, paths, in_threads, _ = stores
    reader = ProcessAdapterReader(cfg, in_threads.partition, 16, ml_dtypes.bfloat16, processes=3)
    try:
        assert reader._started == 0 and reader._idle.empty()
        expected = in_threads._read(in_threads.register("r8", paths["r8"], lazy=True)[0]).page_data
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            rows = list(pool.map(lambda _: reader.read(paths["r8"], "r8")[0], range(6)))
        for r in rows:
            np.testing.assert_array_equal(r.view(np.uint16), expected.view(np.uint16))
        assert 1 <= reader._started <= 3 and reader._idle.qsize() == reader._started
    finally:
        reader.close()


def test_the_automatic_number_of_reader_processes():
    from jslora.engine.adapter_manager import adapter_load_processes
    from jslora.engine.config import EngineConfig

    assert adapter_load_processes(EngineConfig()) == 0  # the CPU: the loader threads read
    assert adapter_load_processes(EngineConfig(adapter_load_processes=3)) == 3
    with pytest.raises(ValueError, match="adapter_load_processes"):
        EngineConfig(adapter_load_processes=-1)


def test_an_engine_serves_adapters_read_by_a_worker_process(checkpoints, rng, tmp_path):
    """PEFT adapters registered lazily and read on first use by a reader process (a host tier too small
    to keep them, so they are read again), greedy tokens against the plain reference; a hostile tenant's
    adapter whose file holds NaN, read by the same worker between them, fails its own requests (400, with
    why) and leaves the others' tokens unchanged."""
    import shutil

    from jslora.llm import LLM
    from jslora.sampling import SamplingParams
    from tests.serving import run_until_done

    ck = checkpoints["mha"]
    bad_dir = tmp_path / "bad"
    shutil.copytree(ck["adapters"][sorted(ck["adapters"])[0]], bad_dir)
    tensors = load_file(str(bad_dir / "adapter_model.safetensors"))
    save_file({k: np.full_like(v, np.nan) for k, v in tensors.items()}, str(bad_dir / "adapter_model.safetensors"))
    llm = LLM(str(ck["dir"]), dtype="float32",
              engine=dict(max_batch=4, max_model_len=64, num_pages=64 * 16, max_lora_rank=16,
                          host_adapter_bytes=1, adapter_load_processes=1, lora_targets=None))
    try:
        names = sorted(ck["adapters"])[:2]
        for name in names:
            llm.engine.register_adapter(name, ck["adapters"][name], lazy=True)
        llm.engine.register_adapter("bad", bad_dir, lazy=True)
        greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        prompts = [rng.integers(3, llm.config.vocab_size, 7).tolist() for _ in names * 2]
        requests = [llm.engine.add_request(p, greedy, name) for p, name in zip(prompts, names * 2)]
        hostile = [llm.engine.add_request(p, greedy, "bad") for p in prompts[:2]]
        outputs = run_until_done(llm.engine, requests + hostile)
        for r in hostile:
            out = outputs[r.request_id]
            assert out.finish_reason == "abort" and out.error_status == 400 and "NaN" in out.error
        reference = llm.generate_reference(prompts, names * 2, greedy)
        assert [outputs[r.request_id].token_ids for r in requests] == [r.token_ids for r in reference]
        store = llm.engine.adapters.store
        assert store._reader is not None and store.source_loads >= len(names)
    finally:
        llm.engine.adapters.close()
