"""Sampling parameters (host) and on-device sampling of one token per row."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20        # top logprobs a request may ask for (as vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 64      # logit_bias entries a request may give
BIAS_WIDTH = 128         # per-row bias table: logit_bias, then min_tokens' masked stop ids


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """As vLLM's: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] | list[int] = ()   # end the request like EOS (even with ignore_eos)
    include_stop_str_in_output: bool = False          # keep the stop string that ended the text
    presence_penalty: float = 0.0      # subtracted from the logits of tokens generated so far (OpenAI's)
    frequency_penalty: float = 0.0     # ... times how often each was generated (OpenAI's)
    repetition_penalty: float = 1.0    # tokens of the prompt or output: logit / p if > 0 else * p (vLLM's)
    logit_bias: dict | None = None     # token id -> added to its logit, [-100, 100] (OpenAI's)
    min_tokens: int = 0                # EOS and stop_token_ids cannot end the request before this many
    logprobs: int | None = None        # the sampled token's logprob and this many top ones (<= MAX_LOGPROBS)
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many top ones (vLLM's)

    def __post_init__(self):
        # real ranges, so a step can always run what is accepted (a top_k of 2**31 once made every
        # request of the batch fail); bool is an int in Python but never a count here
        def integer(value, lo, hi):
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and lo <= value <= hi

        def real(value, lo, hi):
            return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                    and math.isfinite(value) and lo <= value <= hi)

        if not integer(self.max_tokens, 1, INT32_MAX):
            raise ValueError(f"max_tokens must be an integer in [1, {INT32_MAX}], got {self.max_tokens!r}")
        if not real(self.temperature, 0.0, 100.0):
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not real(self.top_p, 0.0, 1.0) or self.top_p == 0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not integer(self.top_k, 0, INT32_MAX):
            raise ValueError(f"top_k must be an integer in [0, {INT32_MAX}] (0 = off), got {self.top_k!r}")
        if self.seed is not None and not integer(self.seed, 0, INT32_MAX):
            raise ValueError(f"seed must be an integer in [0, {INT32_MAX}], got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        for name in ("max_tokens", "top_k", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or len(ids) > 64 or not all(integer(t, 0, INT32_MAX) for t in ids):
            raise ValueError(f"stop_token_ids must be a list of at most 64 token ids, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a boolean, got {self.include_stop_str_in_output!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not real(getattr(self, name), -2.0, 2.0):
                raise ValueError(f"{name} must be a number in [-2, 2], got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(getattr(self, name)))
        if not real(self.repetition_penalty, 0.0, 10.0) or self.repetition_penalty == 0:
            raise ValueError(f"repetition_penalty must be a number in (0, 10], got {self.repetition_penalty!r}")
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        bias = self.logit_bias or {}
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers, "
                             f"got {self.logit_bias!r}")
        checked = {}
        for token, value in bias.items():
            token = int(token) if isinstance(token, str) and token.isdigit() else token
            if not integer(token, 0, INT32_MAX) or not real(value, -100.0, 100.0):
                raise ValueError(f"logit_bias maps token ids to numbers in [-100, 100], got {token!r}: {value!r}")
            checked[int(token)] = float(value)
        object.__setattr__(self, "logit_bias", checked or None)
        if not integer(self.min_tokens, 0, self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not integer(getattr(self, name), 0, MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {getattr(self, name)!r}")

    @property
    def computes_whole_prompt(self) -> bool:
        """Whether the request needs the rows of its whole prompt computed (no prefix cache hit): its
        sampling reads the slot's token state (penalties), built from the rows it prefills, or it asks
        for the prompt's logprobs."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.prompt_logprobs is not None)

    @property
    def needs_sort(self) -> bool:
        """Whether a row needs the step variant that sorts the vocabulary (top-k, top-p, logprobs)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1) or self.logprobs is not None


def process_logits(logits, counts, seen, presence, frequency, repetition, bias_ids, bias_values):
    """Penalties and biases, per row: logits [R, V] f32; counts [R, V] (times each token was generated),
    seen [R, V] bool (in the prompt or the output); presence, frequency, repetition [R] f32; bias_ids,
    bias_values [R, W] (padding: any id with value 0). Neutral values leave a row's logits unchanged."""
    seen = seen | (counts > 0)
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, bias_ids].add(bias_values)


def top_logprobs(logits, tokens, k: int):
    """The sampled tokens' logprobs [R] and the top k (ids, logprobs) [R, k] of the raw logits."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, k)
    return chosen, top_ids.astype(jnp.int32), top_values


def sample(logits, temperature, top_k, top_p, seeds, steps):
    """One token per row. logits [B, V] f32; temperature, top_p [B] f32; top_k, seeds, steps [B] int32.

    A row's randomness depends only on (its seed, its step), never on its batch: the draw happens in
    vocabulary order, so a row without top-k/top-p gets the same token as from `sample_unfiltered`.
    """
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (rank < k) & (mass_before < top_p[:, None])
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return sample_unfiltered(jnp.where(keep, logits, -jnp.inf), temperature, top_k, top_p, seeds, steps)


def sample_unfiltered(logits, temperature, top_k, top_p, seeds, steps):
    """`sample` for batches where no row uses top-k or top-p: no sort over the vocabulary.

    jax.random.categorical is argmax(logits + Gumbel noise), so a sampled row and a greedy one (temperature 0)
    take their token from one argmax over the rows' own choice of the two: one pass over the logits, not two
    (the same tokens as categorical's: tests/test_api.py)."""
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
    sampled = temperature > 0
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    return jnp.argmax(jnp.where(sampled[:, None], scaled + noise, logits), axis=-1).astype(jnp.int32)
