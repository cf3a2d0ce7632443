"""One way to get a model: its ModelConfig, its weights (per-layer buffers, as the engine runs them)
and its tokenizer, from "dummy:<config name>" (random weights at a shipped shape) or a model directory
(HF safetensors, or an orbax checkpoint from `jslora convert` restored straight onto the TP mesh)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from jslora.config import ModelConfig
from jslora.loading.checkpoint import dummy_params, fp8_checkpoint, load_hf_params
from jslora.loading.orbax_checkpoint import has_orbax_params, restore
from jslora.model.llama import unstack_layers
from jslora.parallel import make_mesh
from jslora.tokenizer import byte_tokenizer, load_tokenizer


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: dict
    tokenizer: object | None
    quantization: str | None = None  # "fp8": the checkpoint stores FP8 weights (serve them in FP8)


def resolve_dtype(dtype) -> jnp.dtype:
    """"auto": bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def load_model(model: str, dtype="auto", *, tensor_parallel_size: int = 1, seed: int = 0) -> Model:
    dtype = resolve_dtype(dtype)
    quantization = None
    if model.startswith("dummy:"):
        config = ModelConfig.named(model.removeprefix("dummy:"))
        # under tensor parallelism generated straight into each device's shards
        mesh = make_mesh(tensor_parallel_size) if tensor_parallel_size > 1 else None
        params = dummy_params(config, seed=seed, dtype=dtype, mesh=mesh)
        tokenizer = byte_tokenizer() if config.vocab_size >= 259 else None
    else:
        model_dir = Path(model)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"{model_dir / 'config.json'}: not found (model must be a HF directory or "
                                    f"dummy:<config name>)")
        config = ModelConfig.from_file(model_dir / "config.json")
        if has_orbax_params(model_dir):  # converted (jslora convert): each device reads its own shard
            tp = tensor_parallel_size
            params = restore(model_dir, config, make_mesh(tp) if tp > 1 else None, dtype)
        else:
            params = load_hf_params(model_dir, config, dtype)
            quantization = "fp8" if fp8_checkpoint(model_dir) else None
        has_tokenizer = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
    # per-layer buffers before the pool is sized (unstacking frees each stacked array as it goes)
    return Model(config, unstack_layers(params), tokenizer, quantization)
