"""FP8 base weights (jslora.model.quant) under float LoRA adapters: the quantizer and the matmul against
float64, the engine against a plain model holding the same quantized weights (exact up to accumulation
order), against the original model (how much FP8 changes), and under tensor parallelism."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401 - the checkpoints fixture builds its models with it

from jslora import LLM, SamplingParams
from jslora.model.quant import FP8, SCALE_SUFFIX, dequantize_weight, fp8_matmul, quantize_weight

from test_model_oracle import ADAPTERS, rel_err

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("shape", [(64, 48), (64, 2, 24)])
def test_quantized_weights_and_their_matmul_against_float64(rng, shape):
    w = rng.normal(size=shape) * rng.uniform(0.01, 3.0, size=shape[1:])  # channels of very different scales
    weight, scale = quantize_weight(jnp.asarray(w, jnp.float32))
    assert weight.dtype == FP8 and scale.shape == shape[1:]
    back = np.asarray(dequantize_weight(weight, scale), np.float64)
    # e4m3 keeps 3 mantissa bits: each element within 1/16 of itself, or of the channel's smallest normal
    assert np.all(np.abs(back - w) <= np.abs(w) / 16 + np.asarray(scale) * 2.0 ** -9)
    x = rng.normal(size=(5, shape[0]))
    want = np.tensordot(x, back, axes=1)
    got = fp8_matmul(jnp.asarray(x, jnp.float32), weight, scale)
    assert rel_err(got, want) < 1e-6  # the same quantized weights: float32 accumulation only
    assert 1e-3 < rel_err(fp8_matmul(jnp.asarray(x, jnp.float32), weight, scale, activations=True), want) < 0.1


def _dequantized_copy(checkpoints, fp8: LLM, **kw) -> LLM:
    """The same checkpoint and adapters in float32 whose projections hold the FP8 model's weights, as plain
    float32 arrays (the reference of the FP8 path)."""
    plain = LLM(str(checkpoints["gqa"]["dir"]), _adapters(checkpoints), dtype="float32", max_lora_rank=16, **kw)
    for lp, qp in zip(plain.params["layers"], fp8.params["layers"]):
        for name in [n for n in qp if n + SCALE_SUFFIX in qp]:
            lp[name] = dequantize_weight(qp[name], qp[name + SCALE_SUFFIX])
    return plain


def _adapters(checkpoints):
    return {n: str(p) for n, p in checkpoints["gqa"]["adapters"].items()}


ENGINE = dict(max_model_len=128, engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=32))


def test_fp8_engine_equals_the_same_quantized_weights_and_stays_near_the_original(checkpoints, rng):
    fp8 = LLM(str(checkpoints["gqa"]["dir"]), _adapters(checkpoints), dtype="float32", max_lora_rank=16,
              quantization="fp8", **ENGINE)
    layer = fp8.params["layers"][0]
    assert layer["qkv"].dtype == FP8 and layer["down"].dtype == FP8 and layer["attn_norm"].dtype == jnp.float32
    prompts = [rng.integers(3, fp8.config.vocab_size, int(n)).tolist() for n in rng.integers(3, 60, 8)]
    names = [None, *ADAPTERS, None, ADAPTERS[1], ADAPTERS[3]]
    got = [o.token_ids for o in fp8.generate(prompts, names, GREEDY)]
    reference = _dequantized_copy(checkpoints, fp8, **ENGINE)
    assert got == [o.token_ids for o in reference.generate_reference(prompts, names, GREEDY)]
    assert got == [o.token_ids for o in fp8.generate_reference(prompts, names, GREEDY)]

    # against the original float32 model: FP8 moves logits a little, and greedy tokens mostly agree
    original = LLM(str(checkpoints["gqa"]["dir"]), _adapters(checkpoints), dtype="float32", max_lora_rank=16,
                   **ENGINE)
    from test_model_oracle import our_logits

    many = [rng.integers(3, fp8.config.vocab_size, 12).tolist() for _ in range(48)]
    many_names = [names[i % len(names)] for i in range(48)]
    error = rel_err(our_logits(fp8, np.asarray(many, np.int32), many_names),
                    our_logits(original, np.asarray(many, np.int32), many_names))
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    agree = np.mean([a.token_ids == b.token_ids for a, b in zip(fp8.generate(many, many_names, one),
                                                                 original.generate(many, many_names, one))])
    # the tiny model's random weights (no outlier structure, 64-wide rows) are a hard case for 3 mantissa
    # bits; the numbers are printed so that a change shows
    print(f"FP8 vs float32, tiny GQA model, 48 prompts: logits rel. error {error:.4f}, greedy next token "
          f"agrees {agree:.2f}")
    assert 1e-4 < error < 0.15 and agree >= 0.6


def test_the_fp8_gemm_kernel_in_the_engine_gives_the_same_tokens(checkpoints, rng):
    """EngineConfig.fp8_gemm = "pallas": steps of up to 64 rows multiply on pallas_kernels.fp8_gemm
    (interpret mode here), larger ones on XLA's GEMM; both the same tokens as XLA's alone."""
    prompts = [rng.integers(3, 200, int(n)).tolist() for n in (5, 40, 17)]
    names = [ADAPTERS[1], None, ADAPTERS[3]]
    outputs = []
    for gemm in ("xla", "pallas"):
        llm = LLM(str(checkpoints["gqa"]["dir"]), _adapters(checkpoints), dtype="float32", max_lora_rank=16,
                  quantization="fp8", max_model_len=128,
                  engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, fp8_gemm=gemm))
        outputs.append([o.token_ids for o in llm.generate(prompts, names, GREEDY)])
    assert outputs[0] == outputs[1]


def test_fp8_tensor_parallel_equals_one_device(checkpoints, rng):
    prompts = [rng.integers(3, 200, int(n)).tolist() for n in (5, 33, 17)]
    names = [None, ADAPTERS[0], ADAPTERS[2]]
    outputs = []
    for tp in (1, 2):
        llm = LLM(str(checkpoints["gqa"]["dir"]), _adapters(checkpoints), dtype="float32", max_lora_rank=16,
                  quantization="fp8", max_model_len=128,
                  engine=dict(max_batch=8, num_pages=2048, max_num_batched_tokens=128, tensor_parallel_size=tp))
        outputs.append([o.token_ids for o in llm.generate(prompts, names, GREEDY)])
        if tp == 2:
            scale = llm.params["layers"][0]["qkv" + SCALE_SUFFIX]
            assert scale.sharding.shard_shape(scale.shape)[0] == scale.shape[0] // 2  # split with its columns
    assert outputs[0] == outputs[1]


def test_an_unknown_quantization_is_refused():
    from jslora.engine import EngineConfig

    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="fp8_gemm"):
        EngineConfig(fp8_gemm="cutlass")
