"""Host time to pack one adapter into its pool-page layout (what a cold adapter's first request waits for
after its file is read, and what `--preload` spends per adapter). CPU only; no GPU needed.

    python benchmarks/adapter_pack.py --model llama-7b --ranks 8,64
"""
from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from jslora.config import ModelConfig
from jslora.engine.adapter_store import AdapterStore, load_adapter_spec
from jslora.parallel.lora_partition import LoraPartition
from pallas_kernels.pool import PoolLayout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = ModelConfig.named(args.model)
    ranks = [int(r) for r in args.ranks.split(",")]
    partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 1024, cfg.kv_width), 1, max(ranks))
    store = AdapterStore(cfg, partition, max(ranks), jnp.bfloat16, 1 << 30)
    out = {}
    for rank in ranks:
        adapters = [load_adapter_spec(f"dummy:{rank}", cfg, max(ranks), f"a{i}") for i in range(args.repeats + 1)]
        store._pack(adapters[0])  # first use builds the dummy factors
        seconds = []
        for adapter in adapters[1:]:
            t0 = time.perf_counter()
            host = store._pack(adapter)
            seconds.append(time.perf_counter() - t0)
        out[rank] = {"ms": float(np.median(seconds) * 1e3), "mb": host.page_data.nbytes / 1e6}
        print(f"{args.model} rank {rank}: {out[rank]['ms']:.0f} ms per adapter ({out[rank]['mb']:.0f} MB of pages)")
    return out


if __name__ == "__main__":
    main()
