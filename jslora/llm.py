"""The programmatic API: jslora.LLM(model, adapters).generate(prompts, adapter, sampling).

`generate` and `stream` run on the engine (jslora.engine); `generate_reference` keeps the simple
batched loop over the plain model (contiguous KV cache, reference LoRA banks) as the oracle tests
compare the engine with.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jslora.engine import Engine, EngineConfig
from jslora.engine.adapter_store import load_adapter_spec
from jslora.loading.model import load_model, resolve_dtype
from jslora.model import llama
from jslora.model.lora import stack_adapters
from jslora.request import Request, RequestOutput, RequestUpdate, check_prompt_ids, check_request
from jslora.sampling import SamplingParams, sample
from pallas_kernels.pool import round_up

__all__ = ["LLM", "RequestOutput", "load_adapter_spec"]

FALLBACK_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")


class LLM:
    def __init__(self, model: str, adapters: dict | None = None, *, dtype="auto", max_lora_rank: int = 64,
                 max_model_len: int | None = None, seed: int = 0, engine: EngineConfig | dict | None = None,
                 warmup: bool = False, quantization: str | None = None, enforce_eager: bool | None = None,
                 kv_cache_dtype: str | None = None):
        """engine: EngineConfig options (its max_lora_rank and max_model_len are set from the arguments
        here); warmup: compile every step shape now (servers), instead of on first use; quantization:
        "fp8" stores the base weights in FP8 (jslora.model.quant; adapters stay in dtype); enforce_eager:
        no CUDA graphs (EngineConfig.enforce_eager); kv_cache_dtype: "fp8" keeps keys and values in FP8
        (EngineConfig.kv_cache_dtype), as vLLM's LLM(kv_cache_dtype=...)."""
        self.dtype = resolve_dtype(dtype)
        self.max_lora_rank = max_lora_rank
        engine_config = EngineConfig.from_dict(dict(engine)) if isinstance(engine, dict) else engine or EngineConfig()
        engine_config = dataclasses.replace(engine_config, max_lora_rank=max_lora_rank,
                                            max_model_len=max_model_len or engine_config.max_model_len,
                                            quantization=quantization or engine_config.quantization,
                                            enforce_eager=engine_config.enforce_eager if enforce_eager is None
                                            else enforce_eager,
                                            kv_cache_dtype=kv_cache_dtype or engine_config.kv_cache_dtype)
        loaded = load_model(model, self.dtype, tensor_parallel_size=engine_config.tensor_parallel_size, seed=seed)
        if loaded.quantization and not engine_config.quantization:  # an FP8 checkpoint is served in FP8 (as vLLM)
            engine_config = dataclasses.replace(engine_config, quantization=loaded.quantization)
        self.config, self.params, self.tokenizer = loaded.config, loaded.params, loaded.tokenizer
        self.engine = Engine(self.params, self.config, self.dtype, engine_config, detokenize=self.decode, seed=seed)
        self.params = self.engine.runner.params  # fused (and sharded): the weights are held once
        self.max_model_len = self.engine.max_model_len
        self._rng = np.random.default_rng(seed)
        self._max_token_chars: int | None = None
        for name, spec in (adapters or {}).items():
            self.add_adapter(name, spec)
        if warmup:
            self.engine.warmup()

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, spec) -> None:
        """Register (or replace) an adapter: a PEFT directory, a LoraAdapter or "dummy:<rank>[:targets]"."""
        self.engine.register_adapter(name, spec)

    def remove_adapter(self, name: str) -> None:
        self.engine.unregister_adapter(name)

    def has_adapter(self, name: str) -> bool:
        return name in self.engine.store

    @property
    def adapters(self) -> list[str]:
        return self.engine.store.names()

    def adapter_weights(self, name: str):
        """The registered adapter's LoraAdapter (read again from its source)."""
        return load_adapter_spec(self.engine.store.get(name).source, self.config, self.max_lora_rank, name)

    # -- generation -----------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            prompt = self.tokenizer.encode(prompt)
        return check_prompt_ids(prompt, self.config.vocab_size)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template applied to OpenAI-style messages, with the generation prompt
        (a plain "role: content" template when the tokenizer has none)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 chat_template=template)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)

    def max_chars_per_token(self) -> int:
        """An upper bound on the characters one token stands for (the longest vocabulary entry), so a
        prompt's length in characters bounds its tokens from below without tokenizing it."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return self._max_token_chars

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _requests(self, prompts, adapter, sampling):
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        adapter_names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * n
        if len(adapter_names) != n or len(samplings) != n:
            raise ValueError("adapter and sampling lists must have one entry per prompt")
        for name in adapter_names:
            if name is not None and name not in self.engine.store:
                raise KeyError(f"unknown adapter {name!r}; registered: {sorted(self.adapters)}")
        # all checked before any is queued
        prompt_ids = [check_request(self.encode(p), sp, self.config.vocab_size, self.max_model_len)
                      for p, sp in zip(prompts, samplings)]
        return prompt_ids, adapter_names, samplings

    def generate(self, prompts, adapter: str | None | Sequence[str | None] = None,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion on the engine; outputs in prompt order.
        adapter: a registered adapter's name (or None: the base model), one for all or one per prompt."""
        prompt_ids, adapter_names, samplings = self._requests(prompts, adapter, sampling)
        requests = [self.engine.add_request(ids, sp, name)
                    for ids, sp, name in zip(prompt_ids, samplings, adapter_names)]
        outputs: dict[str, RequestOutput] = {}
        while len(outputs) < len(requests):
            for update in self.engine.step():
                if update.finished:
                    outputs[update.request_id] = update.output
        return [outputs[r.request_id] for r in requests]

    def stream(self, prompt, adapter: str | None = None,
               sampling: SamplingParams | None = None) -> Iterator[RequestUpdate]:
        """Generate one prompt, yielding an update per step with its new token ids (the last one has
        finished=True and the complete output). Closing the iterator early aborts the request."""
        (ids,), (name,), (sp,) = self._requests([prompt], adapter, sampling)
        request = self.engine.add_request(ids, sp, name)
        done = False
        try:
            while not done:
                for update in self.engine.step():
                    if update.request_id == request.request_id:
                        done = update.finished
                        yield update
        finally:
            if not done:
                self.engine.abort(request.request_id)
                while self.engine.has_unfinished():  # let the abort free its pages
                    self.engine.step()

    def generate_reference(self, prompts, adapter=None, sampling=None) -> list[RequestOutput]:
        """The same generation on the plain model, without the engine: the oracle for tests."""
        prompt_ids, adapter_names, samplings = self._requests(prompts, adapter, sampling)
        return self._generate_reference(prompt_ids, adapter_names, samplings)

    def _generate_reference(self, prompt_ids, adapter_names, samplings) -> list[RequestOutput]:
        cfg, n = self.config, len(prompt_ids)
        used = sorted({a for a in adapter_names if a is not None})
        lora = stack_adapters([self.adapter_weights(a) for a in used], cfg, self.dtype) if used else None
        slot = np.array([used.index(a) if a is not None else -1 for a in adapter_names], np.int32)

        lengths = np.array([len(p) for p in prompt_ids], np.int32)
        prompt_len = round_up(int(lengths.max()), 16)
        max_new = max(sp.max_tokens for sp in samplings)
        cache = llama.init_kv_cache(cfg, n, round_up(prompt_len + max_new, 64), self.dtype)
        tokens = np.zeros((n, prompt_len), np.int32)
        for i, p in enumerate(prompt_ids):
            tokens[i, : len(p)] = p

        requests = [Request(f"ref-{i}", list(p), sp, None, sp.seed if sp.seed is not None else
                            int(self._rng.integers(2**31))) for i, (p, sp) in enumerate(zip(prompt_ids, samplings))]
        temperature = jnp.asarray([sp.temperature for sp in samplings], jnp.float32)
        top_p = jnp.asarray([sp.top_p for sp in samplings], jnp.float32)
        top_k = jnp.asarray([sp.top_k for sp in samplings], jnp.int32)
        seeds = jnp.asarray([r.seed for r in requests], jnp.int32)
        adapter_ids = jnp.asarray(slot)

        logits, cache = llama.prefill(self.params, cfg, jnp.asarray(tokens), cache, lora, adapter_ids)
        for i, r in enumerate(requests):
            if r.sampling.prompt_logprobs is not None:
                rows = np.asarray(logits[i, : len(r.prompt_ids) - 1], np.float64)
                r.prompt_logprobs = {p + 1: reference_logprobs(row, r.prompt_ids[p + 1], r.sampling.prompt_logprobs)
                                     for p, row in enumerate(rows)}
        last = jnp.take_along_axis(logits, jnp.asarray(lengths - 1)[:, None, None], axis=1)[:, 0]
        for step in range(max_new):
            raw = np.asarray(last, np.float64)
            processed = np.stack([reference_logits(row, r, cfg.eos_token_ids) for row, r in zip(raw, requests)])
            next_ids = _sample(jnp.asarray(processed, jnp.float32), temperature, top_k, top_p, seeds,
                               jnp.full((n,), step, jnp.int32))
            for row, r, token in zip(raw, requests, np.asarray(next_ids).tolist()):
                if r.finish_reason is None:
                    if r.sampling.logprobs is not None:
                        r.logprobs.append(reference_logprobs(row, token, r.sampling.logprobs))
                    r.finish_reason = r.append_token(token, cfg.eos_token_ids, self.decode)
            if all(r.finish_reason is not None for r in requests):
                break
            positions = jnp.asarray(lengths + step)
            last, cache = llama.decode(self.params, cfg, next_ids, positions, cache, lora, adapter_ids)
        outputs = [self.engine.output(r) for r in requests]
        for out, name in zip(outputs, adapter_names):
            out.adapter, out.request_id = name, None
        return outputs


_sample = jax.jit(sample)


def reference_logits(logits: np.ndarray, request: Request, eos_ids) -> np.ndarray:
    """Penalties, logit_bias and min_tokens applied to one row the plain way (float64; the oracle of
    the engine's on-device process_logits)."""
    sp, x = request.sampling, logits.astype(np.float64).copy()
    counts = collections.Counter(request.generated)
    for t in set(request.prompt_ids) | set(counts):
        x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
    for t, c in counts.items():
        x[t] -= sp.presence_penalty + sp.frequency_penalty * c
    for t, b in (sp.logit_bias or {}).items():
        x[t] += b
    if len(request.generated) < sp.min_tokens:
        x[[*(() if sp.ignore_eos else eos_ids), *sp.stop_token_ids]] = -np.inf
    return x


def reference_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[int], list[float]]:
    """The token's logprob and the top k (ids, logprobs) of one row of raw logits (float64)."""
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.argsort(-logprobs, kind="stable")[:k]
    return float(logprobs[token]), top.tolist(), logprobs[top].tolist()
