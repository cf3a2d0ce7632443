"""Sampling parameters (host) and on-device sampling of one token per row."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2**31 - 1


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
    """`sample` for batches where no row uses top-k or top-p: no sort over the vocabulary."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
