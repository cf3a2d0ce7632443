"""The Llama (also Mistral and Qwen2) as a Flax DecoderLayer applied functionally: params are a plain
pytree, every function is pure and jittable, and the layer's partition metadata gives the
tensor-parallel specs (jslora.parallel.param_specs).

Layout of `params` (weights stored [in, out], layers stacked on a leading axis L for lax.scan):
    embed [V, H], final_norm [H], lm_head [H, V] (absent when embeddings are tied),
    layers: attn_norm, mlp_norm [L, H]; q [L, H, Hq*D]; k, v [L, H, Hkv*D]; o [L, Hq*D, H];
            gate, up [L, H, I]; down [L, I, H]; optional q_bias, k_bias, v_bias, o_bias [L, out].
The engine fuses q, k, v into one `qkv` [H, G, (Hq + 2 Hkv) * D / G] and gate, up into `gate_up`
[H, G, 2 I / G] (fuse_projections): one GEMM instead of three or two, which reads the weights
12-23% faster at 1-128 rows on an H200 (benchmarks/RESULTS.md). G is the tensor-parallel size: group g
holds device g's columns of each part side by side, so splitting axis 1 gives each device its own.
Layout of `lora` (only the targeted projections are present): {target: {"a": [L, N, in, R],
"b": [L, N, R, out]}} with scales folded into "b" (see jslora.model.lora).

`decoder_layer` takes the attention and the LoRA product as callables so that the engine can run the
same layer over the paged pool with the Pallas kernels.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jslora.config import ModelConfig
from jslora.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq
from jslora.model.lora import lora_delta
from jslora.model.quant import SCALE_SUFFIX, fp8_matmul, is_quantized

# attend(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache) -> (out [B,T,Hq,D], cache with k, v written);
# q and k come rotated (rope), unless the layer is called with attend_ropes (attend rotates them itself)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# lora_fn(targets, x [B,T,in], ys, cache) -> ys with y_t + x A_t B_t for each target t that carries LoRA,
# for targets sharing the input x (("q", "k", "v"), ("gate", "up"), ("o",), ("down",)); taking the ys
# lets the kernels accumulate into the base outputs in place and handle a group in one launch. The cache
# is the layer's current one (the engine's adapter rows live in the same pool as its KV).
LoraFn = Callable[[tuple, jax.Array, tuple, Any], tuple]


TP = "tp"  # the tensor-parallel mesh axis named in the modules' partition metadata (jslora.parallel)
_COLUMN = (None, TP)   # [in, out] split by output columns: q, k, v, gate, up
_ROW = (TP, None)      # [in, out] split by input rows: o, down
_GROUPED = (None, TP, None)  # fused [in, G, out / G]: split by group
FUSED_PROJECTIONS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple) -> jax.Array:
    return module.param(name, nn.with_partitioning(nn.initializers.normal(0.02), names), shape)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block (Llama, Mistral, Qwen2), weights stored [in, out] as this
    module's params with their Megatron partition (the tensor-parallel specs are read from it).

    Called with x [B, T, H], the rope tables, a cache that `attend` writes K/V into (threaded through,
    so the caller gets it back updated), `attend`, `lora_fn` and `reduce`; returns (x, cache). Under
    tensor parallelism cfg holds one device's heads and MLP share and `reduce` (a psum) completes the
    row-parallel o and down outputs: after lora_fn, so the LoRA partial sums ride on the same
    all-reduce; their biases are added after it, once. reduce None (one device): the residual is added
    to o's and down's outputs before lora_fn, which then accumulates into the block's output. fused: q,
    k, v and gate, up are stored as the engine's `qkv` and `gate_up` (fuse_projections) in `groups`
    groups; 0: stored apart. quantized: each projection is FP8 with a float32 scale per output channel
    beside it (jslora.model.quant). add_norm(residual, pending, weight) -> (residual + pending, its
    RMSNorm), pending None for nothing to add (pallas_kernels.rms_norm: one launch): o's and down's outputs
    are then left pending and added by the next norm, so x and the result are (residual, pending) pairs."""
    cfg: ModelConfig
    groups: int = 0
    quantized: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, cache, attend: AttendFn, lora_fn: LoraFn, reduce: Callable | None = None,
                 quantized_matmul: Callable = fp8_matmul, row_max: Callable | None = None, attend_ropes: bool = False,
                 add_norm: Callable | None = None):
        cfg = self.cfg
        # add_norm: x is (residual, pending): the residual's last add is left to the next norm (None: none)
        x, pending = x if add_norm is not None else (x, None)
        b, t, _ = x.shape
        shapes = {name: cfg.module_shape(name) for name in ("q", "k", "v", "o", "gate", "up", "down")}
        g = self.groups
        unfused = [n for n in shapes if not (g and any(n in p for p in FUSED_PROJECTIONS.values()))]
        row_parallel = ("o", "down")  # under TP their inputs are split: each device holds a slice of each row
        stored = {name: (shapes[name], _ROW if name in row_parallel else _COLUMN) for name in unfused}
        if g:
            stored.update({fused: ((cfg.hidden_size, g, sum(shapes[n][1] for n in parts) // g), _GROUPED)
                           for fused, parts in FUSED_PROJECTIONS.items()})
        if self.quantized:  # FP8 weights [*out, in]: K contiguous, the layout FP8 tensor-core GEMMs take
            stored = {name: ((*shape[1:], shape[0]), (*names[1:], names[0])) for name, (shape, names) in stored.items()}
        w = {name: _weight(self, name, shape, names) for name, (shape, names) in stored.items()}
        # per output channel: split as the weight's output dimensions are
        scale = {name: self.param(name + SCALE_SUFFIX, nn.with_partitioning(nn.initializers.ones, names[:-1]),
                                  shape[:-1]) for name, (shape, names) in stored.items()} if self.quantized else {}

        def matmul(inp, name):
            if name in scale:  # a slice of each row is quantized by the whole row's max
                return quantized_matmul(inp, w[name], scale[name], row_max=row_max if name in row_parallel else None)
            return jnp.einsum("bti,igo->btgo" if w[name].ndim == 3 else "bti,io->bto", inp, w[name])
        bias = {name: self.param(f"{name}_bias", nn.with_partitioning(nn.initializers.zeros, (TP,)),
                                 (shapes[name][1],)) for name in (("q", "k", "v") if cfg.qkv_bias else ())}
        if cfg.o_bias:
            bias["o"] = self.param("o_bias", nn.with_partitioning(nn.initializers.zeros, (None,)), (cfg.hidden_size,))
        attn_norm = self.param("attn_norm", nn.with_partitioning(nn.initializers.ones, (None,)), (cfg.hidden_size,))
        mlp_norm = self.param("mlp_norm", nn.with_partitioning(nn.initializers.ones, (None,)), (cfg.hidden_size,))

        def project(names, inp, cache, residual=None):
            fused = next((f for f, parts in FUSED_PROJECTIONS.items() if parts == names), None)
            if g and fused is not None:
                outs = split_groups(matmul(inp, fused), [shapes[n][1] for n in names])
            else:
                outs = [matmul(inp, name) for name in names]
            # o's bias waits for the all-reduce unless there is none (residual given: one device)
            outs = [out + bias[name] if name in bias and (name != "o" or residual is not None) else out
                    for name, out in zip(names, outs)]
            if residual is not None:
                outs = [residual + outs[0]]
            return lora_fn(names, inp, tuple(outs), cache)

        def norm(x, pending, weight):
            """-> (the residual with pending added, its RMSNorm)."""
            if add_norm is not None:
                return add_norm(x, pending, weight)
            return x, rms_norm(x, weight, cfg.rms_norm_eps)

        def residual_out(x, name, inp):
            """The residual after the o or down block: its output added, or left pending for the next norm."""
            if reduce is None and add_norm is None:
                # one device: the residual joins the output before its LoRA, so that XLA adds it in the
                # GEMM (as it does without LoRA) and the expand accumulates into the block's output
                (x,) = project((name,), inp, cache, residual=x)
                return x, None
            (out,) = project((name,), inp, cache)
            out = out if reduce is None else reduce(out)
            out = out + bias[name] if name in bias else out   # after the all-reduce: once
            return (x, out) if add_norm is not None else (x + out, None)

        x, h = norm(x, pending, attn_norm)
        q, k, v = project(("q", "k", "v"), h, cache)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if not attend_ropes:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn, cache = attend(q, k, v, cache)
        attn = attn.reshape(b, t, cfg.q_width)
        x, pending = residual_out(x, "o", attn)
        x, h = norm(x, pending, mlp_norm)
        gate, up = project(("gate", "up"), h, cache)
        x, pending = residual_out(x, "down", jax.nn.silu(gate) * up)
        return ((x, pending) if add_norm is not None else x), cache


def split_groups(y, widths: list[int]) -> list:
    """A fused projection's output [..., G, sum(widths) / G] -> one [..., width] per part, each part's
    groups side by side (G = 1 inside a tensor-parallel shard, the TP size when seen whole)."""
    groups = y.shape[-2]
    outs, start = [], 0
    for width in widths:
        local = width // groups
        outs.append(y[..., start:start + local].reshape(*y.shape[:-2], width))
        start += local
    return outs


def fuse_projections(params: dict, cfg: ModelConfig, groups: int = 1, sharding=None) -> dict:
    """Replace each layer's q, k, v by `qkv` and gate, up by `gate_up` (see the module docstring), in
    place, one layer at a time (the parts are freed as they go if nothing else holds them); layers
    already fused are left as they are. groups: the tensor-parallel size; sharding: the fused arrays'
    placement (a NamedSharding over the mesh), if any. Returns params."""
    def fuse(*parts):
        return jnp.concatenate([p.reshape(p.shape[0], groups, -1) for p in parts], axis=-1)

    fuse_jit = jax.jit(fuse, out_shardings=sharding)
    for lp in params["layers"]:
        for fused, names in FUSED_PROJECTIONS.items():
            if fused not in lp:
                for name in names:
                    if cfg.module_shape(name)[1] % groups:
                        raise ValueError(f"{name}'s {cfg.module_shape(name)[1]} columns do not split in {groups}")
                lp[fused] = fuse_jit(*(lp.pop(name) for name in names))
    return params


def projection_of(lp: dict, name: str) -> str:
    """The param of layer lp that holds projection name ("q" -> "qkv" once fused)."""
    return next((f for f, parts in FUSED_PROJECTIONS.items() if name in parts and f in lp), name)


def add_to_projection(lp: dict, cfg: ModelConfig, name: str, delta) -> None:
    """lp[name] += delta [in, out] (float32 sum, in place in the dict), stored alone or fused."""
    if is_quantized(lp):
        raise NotImplementedError("merging a LoRA delta into FP8 weights would re-quantize them")
    fused = projection_of(lp, name)
    if fused == name:
        lp[name] = (lp[name].astype(jnp.float32) + delta).astype(lp[name].dtype)
        return
    w, parts = lp[fused], FUSED_PROJECTIONS[fused]
    groups = w.shape[1]
    start = sum(cfg.module_shape(p)[1] // groups for p in parts[: parts.index(name)])
    local = cfg.module_shape(name)[1] // groups
    column = w[:, :, start:start + local].astype(jnp.float32) + delta.reshape(delta.shape[0], groups, local)
    lp[fused] = w.at[:, :, start:start + local].set(column.astype(w.dtype))


def decoder_layer(cfg: ModelConfig, lp: dict, x, cos, sin, cache, attend: AttendFn, lora_fn: LoraFn,
                  reduce: Callable | None = None, quantized_matmul: Callable = fp8_matmul,
                  row_max: Callable | None = None, attend_ropes: bool = False, add_norm: Callable | None = None):
    """DecoderLayer applied functionally over one layer's params pytree (plain or fused by
    fuse_projections, float or FP8): the oracle model and the engine's paged steps both run it.
    quantized_matmul(x, weight, scale[, row_max]): how FP8 projections multiply (jslora.model.quant);
    row_max: under tensor parallelism, the max over the devices' slices of a row (a pmax), given to the
    row-parallel projections so that quantized activations match one device's. attend_ropes: attend gets q
    and k before rope and rotates them itself (the engine's rope in its K/V write, pallas_kernels.rope_kv).
    add_norm: each residual add done by the norm after it (DecoderLayer), x and the result (residual,
    pending) pairs."""
    quantized = is_quantized(lp)
    # fused [in, G, out / G], or [G, out / G, in] as FP8
    groups = (lp["qkv"].shape[0] if quantized else lp["qkv"].shape[1]) if "qkv" in lp else 0
    return DecoderLayer(cfg, groups, quantized).apply({"params": lp}, x, cos, sin, cache, attend, lora_fn,
                                                              reduce, quantized_matmul, row_max, attend_ropes,
                                                              add_norm)


@functools.cache
def layer_partition_names(cfg: ModelConfig, quantized: bool = False) -> dict:
    """A layer's param name -> its partition names (None or "tp" per dimension), from DecoderLayer's
    metadata (no weights are made: shapes only); both layouts' names (plain and fused); quantized: the
    FP8 layers' (weights stored [*out, in], scales beside them)."""
    x = jnp.zeros((1, 1, cfg.hidden_size))
    cos = sin = jnp.zeros((1, 1, cfg.head_dim))

    def attend(q, k, v, cache):
        return q, cache

    def lora_fn(names, inp, outs, cache):
        return outs

    names = {}
    for groups in (0, 1):
        boxed = jax.eval_shape(lambda g=groups: DecoderLayer(cfg, g, quantized).init(
            jax.random.PRNGKey(0), x, cos, sin, None, attend, lora_fn))["params"]
        names.update({name: tuple(box.names) for name, box in boxed.items()})
    return names


def unstack_layers(params: dict) -> dict:
    """params with layers as a list of per-layer dicts (separate buffers: the engine's layout). It
    empties params["layers"] as it goes, so each stacked array is freed once split (if nothing else
    holds it) and peak memory stays near one copy of the weights."""
    if isinstance(params["layers"], list):
        return params
    stacked = params["layers"]
    num_layers = next(iter(stacked.values())).shape[0]
    layers = [{} for _ in range(num_layers)]
    for name in list(stacked):
        weight = stacked.pop(name)
        for i in range(num_layers):
            layers[i][name] = weight[i]
        del weight
    return {**params, "layers": layers}


def stack_layers(params: dict) -> dict:
    """The inverse of unstack_layers (the reference `forward` scans over stacked layers)."""
    if not isinstance(params["layers"], list):
        return params
    names = params["layers"][0]
    return {**params, "layers": {n: jnp.stack([lp[n] for lp in params["layers"]]) for n in names}}


def logits_from_hidden(params: dict, cfg: ModelConfig, x):
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...h,hv->...v", x, head, preferred_element_type=jnp.float32)


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """A plain contiguous cache: k, v of [L, B, max_len, Hkv, D]."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def contiguous_attention(q, k_cache, v_cache, positions):
    """Causal GQA attention of new queries over a contiguous cache that already holds their keys.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D]; positions: [B, T] absolute position of each query.
    Cache entries past a query's position (including stale or padding entries) are masked out.
    """
    b, t, hq, d = q.shape
    hkv = k_cache.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    key_pos = jnp.arange(k_cache.shape[1])
    mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def forward(params: dict, cfg: ModelConfig, tokens, start, cache: dict, lora: dict | None = None,
            adapter_ids=None):
    """Run T new tokens per sequence, appended at per-row offsets, through the model.

    tokens: [B, T] int; start: [B] int, position of tokens[:, 0]; cache: from init_kv_cache (donated);
    lora: reference LoRA banks or None; adapter_ids: [B] or [B, T] bank slot per token, -1 = base model.
    Returns (logits [B, T, V] float32, updated cache).
    """
    params = stack_layers(params)  # the engine keeps per-layer buffers; this reference scans
    b, t = tokens.shape
    positions = start[:, None] + jnp.arange(t)[None, :]
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
    lora = lora or {}
    if adapter_ids is None:
        adapter_ids = jnp.full((b, t), -1, jnp.int32)
    adapter_ids = jnp.broadcast_to(adapter_ids.reshape(b, -1), (b, t))

    write_rows = jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice(row, new, (s, 0, 0)))

    def attend(q, k, v, cache):
        k_cache = write_rows(cache[0], k.astype(cache[0].dtype), start)
        v_cache = write_rows(cache[1], v.astype(cache[1].dtype), start)
        return contiguous_attention(q, k_cache, v_cache, positions), (k_cache, v_cache)

    def layer_step(x, layer):
        lp, layer_lora, k_cache, v_cache = layer

        def lora_fn(names, inp, outs, _):
            return tuple(out + lora_delta(inp, layer_lora[name]["a"], layer_lora[name]["b"], adapter_ids)
                         if name in layer_lora else out for name, out in zip(names, outs))

        return decoder_layer(cfg, lp, x, cos, sin, (k_cache, v_cache), attend, lora_fn)

    x = params["embed"][tokens]
    x, (k, v) = jax.lax.scan(layer_step, x, (params["layers"], lora, cache["k"], cache["v"]))
    return logits_from_hidden(params, cfg, x), {"k": k, "v": v}


def prefill(params, cfg, tokens, cache, lora=None, adapter_ids=None):
    """Prompts from position 0 (right-padded rows are fine: later steps overwrite the padding)."""
    start = jnp.zeros((tokens.shape[0],), jnp.int32)
    return forward(params, cfg, tokens, start, cache, lora, adapter_ids)


def decode(params, cfg, tokens, positions, cache, lora=None, adapter_ids=None):
    """One token per sequence. tokens, positions: [B]."""
    logits, cache = forward(params, cfg, tokens[:, None], positions, cache, lora, adapter_ids)
    return logits[:, 0], cache
