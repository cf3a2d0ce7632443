"""What the step's sampling tail costs over a wide vocabulary (docs/PERFORMANCE.md, lever 7), and what one pass
would save.

    PYTHONPATH=. python benchmarks/sampling_probe.py            # GPU: $OUT/sampling_probe.json
    PYTHONPATH=. python benchmarks/sampling_probe.py --quick    # CPU smoke run

The step's tail after the logits (jslora.model.paged._step): gather the sampled rows' token counts and seen flags
from the per-slot state, apply penalties and biases (jslora.sampling.process_logits), sample (greedy and Gumbel
argmaxes, sample_unfiltered), count the new tokens. Timed alone at the step's shapes, device time by a loop
(benchmarks.common.timed), in three forms:

- "step": the step's code as it is: since the forty-sixth session the greedy and the sampled token come from one
  argmax over where(temperature > 0, scaled + Gumbel noise, logits).
- "two_argmax": the code before, a greedy argmax and jax.random.categorical's beside it (the same tokens,
  checked; one more pass over the penalized logits).
- "no_noise": greedy only (no random bits): what the noise costs.

Each against its floor: the bytes one pass must read (logits f32, counts int32, seen int8) at the copy rate.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, rooflines, timed, write_json
from jslora.sampling import BIAS_WIDTH, process_logits, sample_unfiltered

SHAPES = {"llama3_b256": (256, 128256), "s1_b384": (384, 32000), "llama3_b32": (32, 128256)}


def two_argmax(logits, temperature, seeds, steps):
    """sample_unfiltered as it was before the forty-sixth session: a greedy argmax and a categorical draw."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def sampled_tokens(form: str, state, logits, slots, sp):
    counts, seen = state
    processed = process_logits(logits, counts[slots], seen[slots] > 0, sp["presence"], sp["frequency"],
                               sp["repetition"], sp["bias_ids"], sp["bias_values"])
    if form == "step":
        return sample_unfiltered(processed, sp["temperature"], sp["top_k"], sp["top_p"], sp["seeds"], sp["steps"])
    if form == "two_argmax":
        return two_argmax(processed, sp["temperature"], sp["seeds"], sp["steps"])
    return jnp.argmax(processed, axis=-1).astype(jnp.int32)


def make_tail(form: str):
    def tail(state, logits, slots, sp):  # the step's state update: the sampled tokens counted
        counts, seen = state
        return counts.at[slots, sampled_tokens(form, state, logits, slots, sp)].add(1), seen
    return tail


def inputs(rows: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    slots = rng.permutation(rows + 1)[:rows].astype(np.int32)
    sp = {"presence": rng.uniform(0, 1, rows), "frequency": rng.uniform(0, 0.5, rows),
          "repetition": rng.uniform(1, 1.3, rows), "temperature": np.where(np.arange(rows) % 2, 0.8, 0.0),
          "top_k": np.zeros(rows), "top_p": np.ones(rows), "seeds": rng.integers(0, 2**31 - 1, rows),
          "steps": rng.integers(0, 500, rows), "bias_ids": rng.integers(0, vocab, (rows, BIAS_WIDTH)),
          "bias_values": rng.uniform(-5, 5, (rows, BIAS_WIDTH))}
    sp = {k: jnp.asarray(v, jnp.int32 if k in ("top_k", "seeds", "steps", "bias_ids") else jnp.float32)
          for k, v in sp.items()}
    logits = jnp.asarray(rng.normal(0, 3, (rows, vocab)), jnp.float32)
    counts = jnp.asarray(rng.poisson(0.01, (rows + 1, vocab)), jnp.int32)
    seen = jnp.asarray(rng.random((rows + 1, vocab)) < 0.01, jnp.int8)
    return (counts, seen), logits, jnp.asarray(slots), sp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, no rooflines (CPU)")
    args = parser.parse_args()
    shapes = {"quick": (8, 1000)} if args.quick else SHAPES
    roof = None if args.quick else rooflines()
    results = []
    for name, (rows, vocab) in shapes.items():
        state, logits, slots, sp = inputs(rows, vocab)
        tokens = {form: jax.jit(sampled_tokens, static_argnums=0)(form, state, logits, slots, sp)
                  for form in ("step", "two_argmax")}
        same = bool(jnp.array_equal(*tokens.values()))
        bytes_read = rows * vocab * (4 + 4 + 1)
        row = {"shape": name, "rows": rows, "vocab": vocab, "same_tokens": same, "bytes": bytes_read}
        for form in ("step", "two_argmax", "no_noise"):
            row[f"{form}_us"] = 1e6 * timed(make_tail(form), state, logits, slots, sp)
        if roof:
            row["floor_us"] = 1e6 * bytes_read / roof["hbm_bytes_per_s"]
        results.append(row)
        print(row, flush=True)
    path = write_json("sampling_probe.json", {"env": environment(), "roofline": roof, "results": results})
    print(f"\n{'shape':<12} {'step us':>9} {'two argmax':>11} {'no noise':>9} {'floor us':>9} same")
    for r in results:
        print(f"{r['shape']:<12} {r['step_us']:9.1f} {r['two_argmax_us']:11.1f} {r['no_noise_us']:9.1f} "
              f"{r.get('floor_us', float('nan')):9.1f} {r['same_tokens']}")
    print(path)


if __name__ == "__main__":
    main()
