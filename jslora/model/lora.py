"""Reference multi-adapter LoRA: a per-token gather of A and B, ranks zero-padded to the bank's maximum.

This is the oracle the Pallas kernels (pallas_kernels/) are checked against. A "bank" holds, for one
projection of one layer, A [n_slots, in, R] and B [n_slots, R, out] with the adapter's scale
(alpha / r, or alpha / sqrt(r) with rsLoRA) already folded into B. Zero rows past an adapter's own rank
contribute nothing, so the result equals the unpadded product.
"""
from __future__ import annotations

import jax.numpy as jnp


def lora_delta(x, lora_a, lora_b, adapter_ids):
    """sum_r (x @ A[a]) @ B[a] for each token.

    x: [..., in]; lora_a: [n_slots, in, R]; lora_b: [n_slots, R, out];
    adapter_ids: x.shape[:-1], int; -1 means no adapter (the base model).
    """
    slot = jnp.maximum(adapter_ids, 0)
    shrunk = jnp.einsum("...i,...ir->...r", x, lora_a[slot], preferred_element_type=jnp.float32)
    expanded = jnp.einsum("...r,...ro->...o", shrunk, lora_b[slot].astype(jnp.float32))
    expanded = jnp.where((adapter_ids >= 0)[..., None], expanded, 0.0)
    return expanded.astype(x.dtype)


def stack_adapters(adapters, cfg, dtype=jnp.float32) -> dict:
    """Host adapters (jslora.loading.peft_adapter.LoraAdapter) -> reference banks, slot i = adapters[i].

    Each target's bank is zero-padded to the largest rank any adapter has on it; an adapter without
    that target gets a zero slot.
    """
    import numpy as np  # host-side only

    banks = {}
    for target in ("q", "k", "v", "o", "gate", "up", "down"):
        carriers = [ad for ad in adapters if target in ad.weights]
        if not carriers:
            continue
        rank = max(ad.weights[target][0].shape[-1] for ad in carriers)
        fan_in, fan_out = cfg.module_shape(target)
        a = np.zeros((cfg.num_layers, len(adapters), fan_in, rank), np.float32)
        b = np.zeros((cfg.num_layers, len(adapters), rank, fan_out), np.float32)
        for slot, ad in enumerate(adapters):
            if target in ad.weights:
                wa, wb = ad.weights[target]
                a[:, slot, :, : wa.shape[-1]] = wa
                b[:, slot, : wb.shape[1], :] = wb
        banks[target] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
    return banks
