"""Megatron-style tensor parallelism over a mesh axis "tp".

q, k, v, gate and up are split by output columns (each device holds its heads and its slice of the
MLP), o and down by input rows, so a layer needs two all-reduces of its [tokens, H] output (after o
and after down) and nothing else. Embedding, norms and the LM head are replicated. The unified pool
is split by page width: a page holds one token's K (or V) in one layer, and its columns are the KV
heads, so each device keeps its own heads' KV.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jslora.config import ModelConfig

TP_AXIS = "tp"
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # as DecoderLayer's partition metadata splits them


def make_mesh(size: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if size > len(devices):
        raise ValueError(f"tensor_parallel_size {size} needs {size} devices; {len(devices)} are visible "
                         f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={size})")
    return Mesh(np.array(devices[:size]), (TP_AXIS,))


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The shapes one device sees: its share of the heads and of the MLP."""
    for what, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % size:
            raise ValueError(f"tensor_parallel_size {size} must divide {what} ({n})")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // size, num_kv_heads=cfg.num_kv_heads // size,
                               intermediate_size=cfg.intermediate_size // size)


def param_specs(params: dict, cfg: ModelConfig) -> dict:
    """PartitionSpecs for params with per-layer weights (jslora.model.llama.unstack_layers): a layer's
    from DecoderLayer's partition metadata; embedding, final norm and LM head replicated."""
    from jslora.model.llama import TP, layer_partition_names
    from jslora.model.quant import is_quantized

    assert TP == TP_AXIS
    names = {q: layer_partition_names(cfg, q) for q in {is_quantized(lp) for lp in params["layers"]}}
    return {**{k: P() for k in params if k != "layers"},
            "layers": [{name: P(*names[is_quantized(lp)][name]) for name in lp} for lp in params["layers"]]}


def shard_params(params: dict, mesh: Mesh, cfg: ModelConfig) -> dict:
    specs = param_specs(params, cfg)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
