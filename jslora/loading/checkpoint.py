"""HF model directories -> our params pytree, and random `dummy` weights at any config's shapes.

FP8 checkpoints (config.json's quantization_config with quant_method "fp8", as transformers'
FineGrainedFP8 and vLLM write them, or "compressed-tensors") store each linear weight as float8 e4m3
[out, in] with its dequantization scale beside it: `weight_scale_inv` (block-wise, transformers) or
`weight_scale` (per tensor, per output channel or block-wise). They are read back to the model's dtype
here; the engine then quantizes per output channel again (`fp8_checkpoint` says it should), which
gives back the stored FP8 values exactly when the checkpoint's scales were per channel.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jslora.config import HF_MODULE_NAMES, ModelConfig
from jslora.loading.safetensors_io import TensorReader

_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def _hf_layer_name(target: str, layer: int) -> str:
    block = "mlp" if target in ("gate", "up", "down") else "self_attn"
    return f"model.layers.{layer}.{block}.{HF_MODULE_NAMES[target]}"


def fp8_checkpoint(model_dir: str | Path) -> dict | None:
    """The checkpoint's FP8 quantization_config, or None if its weights are not stored in FP8."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    method = config.get("quant_method")
    # compressed-tensors names its schemes per group: FP8 weights are {"type": "float", "num_bits": 8}
    groups = (config.get("config_groups") or {}).values() if method == "compressed-tensors" else ()
    fp8_groups = any((g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 8
                     for g in groups if isinstance(g, dict))
    return config if method == "fp8" or fp8_groups else None


def _dequantized(weight: np.ndarray, scale: np.ndarray, name: str) -> np.ndarray:
    """An FP8 weight [out, in] times its scale: scalar, per output channel ([out] or [out, 1]) or per
    block ([ceil(out / bo), ceil(in / bi)])."""
    out, fan_in = weight.shape
    w = weight.astype(np.float32)
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return w * scale.reshape(())
    if scale.size == out:
        return w * scale.reshape(out, 1)
    if scale.ndim == 2:
        bo, bi = -(-out // scale.shape[0]), -(-fan_in // scale.shape[1])
        return w * np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[:out, :fan_in]
    raise ValueError(f"{name}: a scale of shape {scale.shape} does not fit an FP8 weight of shape {weight.shape}")


def load_hf_params(model_dir: str | Path, cfg: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """Read a HF Llama/Mistral/Qwen2 checkpoint (safetensors) into the layout of jslora.model.llama."""
    model_dir = Path(model_dir)
    with TensorReader.from_model_dir(model_dir) as reader:

        def tensor(name: str, shape: tuple) -> np.ndarray:
            if name not in reader:
                raise ValueError(f"{model_dir}: tensor {name!r} is missing from the checkpoint")
            array = reader.get(name)
            if array.shape != shape:
                raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {array.shape}, "
                                 f"config.json implies {shape}")
            if array.dtype == jnp.float8_e4m3fn:  # an FP8 checkpoint: read back with its scale
                scale = next((f"{name}{s}" for s in ("_scale_inv", "_scale") if f"{name}{s}" in reader), None)
                if scale is None:
                    raise ValueError(f"{reader.file_of(name)}: FP8 tensor {name!r} has no {name}_scale(_inv) beside it")
                array = _dequantized(array, reader.get(scale), name)
            return array

        def stacked(make, shape) -> jax.Array:
            # fill one host buffer a layer at a time, then one transfer: peak host memory ~ one copy
            out = np.empty((cfg.num_layers, *shape), dtype=jnp.dtype(dtype))
            for i in range(cfg.num_layers):
                out[i] = make(i)
            return jnp.asarray(out)

        layers = {
            "attn_norm": stacked(lambda i: tensor(f"model.layers.{i}.input_layernorm.weight",
                                                  (cfg.hidden_size,)), (cfg.hidden_size,)),
            "mlp_norm": stacked(lambda i: tensor(f"model.layers.{i}.post_attention_layernorm.weight",
                                                 (cfg.hidden_size,)), (cfg.hidden_size,)),
        }
        for target in _LINEAR:
            fan_in, fan_out = cfg.module_shape(target)
            layers[target] = stacked(
                lambda i, t=target: tensor(f"{_hf_layer_name(t, i)}.weight", (fan_out, fan_in)).T,
                (fan_in, fan_out))
        biased = (("q", "k", "v") if cfg.qkv_bias else ()) + (("o",) if cfg.o_bias else ())
        for target in biased:
            fan_out = cfg.module_shape(target)[1]
            layers[f"{target}_bias"] = stacked(
                lambda i, t=target: tensor(f"{_hf_layer_name(t, i)}.bias", (fan_out,)), (fan_out,))

        vh = (cfg.vocab_size, cfg.hidden_size)
        params = {
            "embed": jnp.asarray(tensor("model.embed_tokens.weight", vh), dtype),
            "final_norm": jnp.asarray(tensor("model.norm.weight", (cfg.hidden_size,)), dtype),
            "layers": layers,
        }
        if not cfg.tie_word_embeddings:
            params["lm_head"] = jnp.asarray(tensor("lm_head.weight", vh).T, dtype)
    return params


def dummy_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16, std: float = 0.02, mesh=None) -> dict:
    """Random weights at the config's shapes, generated on the device one layer at a time (a single call
    over all layers needs ~12 bytes per element of temporaries, measured on an H100), as per-layer
    buffers (the engine's layout). With a tensor-parallel mesh each layer is generated straight into its
    shards, so a Llama-70B (138 GB) never sits on one GPU; the values are the same with or without one."""
    h = cfg.hidden_size

    def normal(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)

    def one_layer(k):
        ks = jax.random.split(k, len(_LINEAR) + 4)
        lp = {t: normal(ks[j], cfg.module_shape(t)) for j, t in enumerate(_LINEAR)}
        lp["attn_norm"] = jnp.ones((h,), dtype)
        lp["mlp_norm"] = jnp.ones((h,), dtype)
        if cfg.qkv_bias:
            for j, t in enumerate(("q", "k", "v")):
                lp[f"{t}_bias"] = normal(ks[len(_LINEAR) + j], (cfg.module_shape(t)[1],))
        if cfg.o_bias:
            lp["o_bias"] = normal(ks[-1], (h,))
        return lp

    k_layers, k_embed, k_head = jax.random.split(jax.random.PRNGKey(seed), 3)
    layer_keys = jax.random.split(k_layers, cfg.num_layers)
    layer_out, replicated = {}, {}
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from jslora.parallel import param_specs

        specs = param_specs({"layers": [jax.eval_shape(one_layer, layer_keys[0])]}, cfg)["layers"][0]
        layer_out = {"out_shardings": {n: NamedSharding(mesh, s) for n, s in specs.items()}}
        replicated = {"out_shardings": NamedSharding(mesh, P())}
    make_layer = jax.jit(one_layer, **layer_out)
    make_matrix = jax.jit(normal, static_argnums=1, **replicated)
    params = {"embed": make_matrix(k_embed, (cfg.vocab_size, h)),
              "final_norm": jax.jit(lambda: jnp.ones((h,), dtype), **replicated)(),
              "layers": [make_layer(k) for k in layer_keys]}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = make_matrix(k_head, (h, cfg.vocab_size))
    return params
