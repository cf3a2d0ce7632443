"""The programmatic API: jslora.LLM(model, adapters).generate(prompts, adapter, sampling).

Here generate runs a simple batched loop over the reference model (contiguous KV cache, reference
LoRA banks). The engine replaces the loop, not the API.
"""
from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jslora.config import ModelConfig
from jslora.loading.checkpoint import dummy_params, load_hf_params
from jslora.loading.peft_adapter import AdapterError, LoraAdapter, dummy_adapter, load_peft_adapter
from jslora.model import llama
from jslora.model.lora import stack_adapters
from jslora.sampling import SamplingParams, sample
from jslora.tokenizer import byte_tokenizer, load_tokenizer


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" or "stop"
    adapter: str | None = None


def resolve_dtype(dtype) -> jnp.dtype:
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def load_adapter_spec(spec, cfg: ModelConfig, max_rank: int, name: str) -> LoraAdapter:
    """A PEFT directory, a LoraAdapter, or "dummy:<rank>[:<targets comma-separated>]" (random)."""
    if isinstance(spec, LoraAdapter):
        return dataclasses.replace(spec, name=name)
    spec = str(spec)
    if spec.startswith("dummy:"):
        parts = spec.split(":")
        rank = int(parts[1])
        if rank > max_rank:
            raise AdapterError(f"dummy adapter {name!r}: rank {rank} is above max_lora_rank {max_rank}")
        targets = tuple(parts[2].split(",")) if len(parts) > 2 else ("q", "k", "v", "o")
        seed = zlib.crc32(name.encode())  # stable across processes, unlike hash()
        return dummy_adapter(cfg, rank, targets, seed=seed, name=name)
    return load_peft_adapter(spec, cfg, max_rank, name=name)


class LLM:
    def __init__(self, model: str, adapters: dict | None = None, *, dtype="auto", max_lora_rank: int = 64,
                 max_model_len: int | None = None, seed: int = 0):
        self.dtype = resolve_dtype(dtype)
        self.max_lora_rank = max_lora_rank
        if model.startswith("dummy:"):
            self.config = ModelConfig.named(model.removeprefix("dummy:"))
            self.params = dummy_params(self.config, seed=seed, dtype=self.dtype)
            self.tokenizer = byte_tokenizer() if self.config.vocab_size >= 259 else None
        else:
            model_dir = Path(model)
            if not (model_dir / "config.json").exists():
                raise FileNotFoundError(f"{model_dir / 'config.json'}: not found (model must be a HF "
                                        f"directory or dummy:<config name>)")
            self.config = ModelConfig.from_file(model_dir / "config.json")
            self.params = load_hf_params(model_dir, self.config, self.dtype)
            has_tokenizer = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
            self.tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.adapters: dict[str, LoraAdapter] = {}
        self._rng = np.random.default_rng(seed)
        for name, spec in (adapters or {}).items():
            self.add_adapter(name, spec)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, spec) -> None:
        self.adapters[name] = load_adapter_spec(spec, self.config, self.max_lora_rank, name)

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}")
        del self.adapters[name]

    # -- generation -----------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(self, prompts, adapter: str | None | Sequence[str | None] = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        adapter_names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * n
        if len(adapter_names) != n or len(samplings) != n:
            raise ValueError("adapter and sampling lists must have one entry per prompt")
        for name in adapter_names:
            if name is not None and name not in self.adapters:
                raise KeyError(f"unknown adapter {name!r}; registered: {sorted(self.adapters)}")
        prompt_ids = [self.encode(p) for p in prompts]
        for ids, sp in zip(prompt_ids, samplings):
            if len(ids) + sp.max_tokens > self.max_model_len:
                raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds "
                                 f"the model's context length {self.max_model_len}")
        return self._generate_reference(prompt_ids, adapter_names, samplings)

    def _generate_reference(self, prompt_ids, adapter_names, samplings) -> list[RequestOutput]:
        cfg, n = self.config, len(prompt_ids)
        used = sorted({a for a in adapter_names if a is not None})
        lora = stack_adapters([self.adapters[a] for a in used], cfg, self.dtype) if used else None
        slot = np.array([used.index(a) if a is not None else -1 for a in adapter_names], np.int32)

        lengths = np.array([len(p) for p in prompt_ids], np.int32)
        prompt_len = _round_up(int(lengths.max()), 16)
        max_new = max(sp.max_tokens for sp in samplings)
        cache = llama.init_kv_cache(cfg, n, _round_up(prompt_len + max_new, 64), self.dtype)
        tokens = np.zeros((n, prompt_len), np.int32)
        for i, p in enumerate(prompt_ids):
            tokens[i, : len(p)] = p

        temperature = jnp.asarray([sp.temperature for sp in samplings], jnp.float32)
        top_p = jnp.asarray([sp.top_p for sp in samplings], jnp.float32)
        top_k = jnp.asarray([sp.top_k for sp in samplings], jnp.int32)
        seeds = jnp.asarray([sp.seed if sp.seed is not None else int(self._rng.integers(2**31))
                             for sp in samplings], jnp.int32)
        adapter_ids = jnp.asarray(slot)

        logits, cache = llama.prefill(self.params, cfg, jnp.asarray(tokens), cache, lora, adapter_ids)
        last = jnp.take_along_axis(logits, jnp.asarray(lengths - 1)[:, None, None], axis=1)[:, 0]
        generated: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        texts = [""] * n
        for step in range(max_new):
            next_ids = _sample(last, temperature, top_k, top_p, seeds, jnp.full((n,), step, jnp.int32))
            host_ids = np.asarray(next_ids)
            for i in range(n):
                if finish[i] is None:
                    finish[i], texts[i] = self._append(generated[i], int(host_ids[i]), samplings[i])
            if all(f is not None for f in finish):
                break
            positions = jnp.asarray(lengths + step)
            last, cache = llama.decode(self.params, cfg, next_ids, positions, cache, lora, adapter_ids)
        return [RequestOutput(list(p), g, t, f, a)
                for p, g, t, f, a in zip(prompt_ids, generated, texts, finish, adapter_names)]

    def _append(self, generated: list[int], token: int, sp: SamplingParams) -> tuple[str | None, str]:
        """Add a token; return (finish reason or None, text so far) under max_tokens, EOS and stop strings."""
        generated.append(token)
        is_eos = token in self.config.eos_token_ids and not sp.ignore_eos
        text = self.decode(generated[:-1] if is_eos else generated)
        for stop in sp.stop:
            at = text.find(stop)
            if at >= 0:
                return "stop", text[:at]
        if is_eos:
            return "stop", text
        if len(generated) >= sp.max_tokens:
            return "length", text
        return None, text


_sample = jax.jit(sample)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
