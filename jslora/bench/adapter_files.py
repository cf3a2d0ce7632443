"""PEFT adapter directories on local disk for `jslora bench --adapter-dir`: the trace's adapters are read
from disk on first use, through the same loader and host tier as a server's (not generated, not
preloaded). Each directory holds adapter_config.json and adapter_model.safetensors as PEFT writes them
(lora_A [r, in], lora_B [out, r] per layer and projection, float16). Thousands of Llama-7B adapters do
not fit a small disk (16.8 MB each at rank 8 on q,k,v,o), so with `distinct` only that many weight
files per rank are written and the other directories hard-link them: every adapter is still its own
directory, parsed and checked on its own, though repeated files may come from the OS page cache.
Directories already written are reused.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from jslora.config import HF_MODULE_NAMES, ModelConfig
from jslora.loading.peft_adapter import dummy_adapter


def _tensors(cfg: ModelConfig, rank: int, targets, seed: int) -> dict[str, np.ndarray]:
    adapter = dummy_adapter(cfg, rank, targets, seed=seed)
    out = {}
    for target, (a, b) in adapter.weights.items():  # A [L, in, r], B [L, r, out]
        block = "mlp" if target in ("gate", "up", "down") else "self_attn"
        for layer in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{layer}.{block}.{HF_MODULE_NAMES[target]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].T, np.float16)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].T, np.float16)
    return out


def write_peft_adapters(root: str | Path, ranks: dict[str, int], cfg: ModelConfig, targets=("q", "k", "v", "o"),
                        distinct: int | None = None, progress: bool = True) -> dict[str, str]:
    """Write (or reuse) a PEFT directory root/<name> per adapter of `ranks` (name -> rank); returns
    name -> directory. distinct: weight files written per rank; the other directories link to them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written: dict[int, list[Path]] = {}
    paths = {}
    for i, (name, rank) in enumerate(tqdm(ranks.items(), desc="adapter files", unit="adapter", disable=not progress)):
        path = root / name
        paths[name] = str(path)
        weights = path / "adapter_model.safetensors"
        files = written.setdefault(rank, [])
        if not weights.exists():
            path.mkdir(exist_ok=True)
            config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                      "target_modules": [HF_MODULE_NAMES[t] for t in targets], "bias": "none",
                      "base_model_name_or_path": cfg.name}
            (path / "adapter_config.json").write_text(json.dumps(config))
            if distinct is None or len(files) < distinct:
                save_file(_tensors(cfg, rank, targets, seed=i), str(weights))
            else:
                source = files[i % len(files)]
                try:
                    os.link(source, weights)
                except OSError:  # a file system without hard links: a copy
                    shutil.copyfile(source, weights)
        if distinct is None or len(files) < distinct:
            files.append(weights)
    return paths
