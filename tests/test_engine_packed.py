"""The engine with its decode LoRA on the packed kernels (pallas_kernels.lora_packed: decode_lora_tile = 1,
decode_lora_tiling {"packed": true}): greedy tokens equal to the default engine's over a batch mixing adapters
and a row without one, on the MHA model, whose q, k, v and o rows are one pool page wide."""
from __future__ import annotations

from jslora import LLM, SamplingParams
from jslora.engine.config import EngineConfig
from pallas_kernels import lora as lora_module
from pallas_kernels.lora_packed import lora_packed_group

PACKED = {"packed": True, "packed_pack": 4, "packed_block": 32, "packed_k_splits": 2, "packed_k_block": 16,
          "packed_out_block": 32}


def test_packed_decode_lora_gives_the_default_engines_tokens(checkpoints, rng, monkeypatch):
    ck = checkpoints["mha"]
    adapters = {n: ck["adapters"][n] for n in ("r4_qv", "r8_all_rslora")}
    traced = []   # the steps trace the packed kernels: no silent fall-back to the others
    monkeypatch.setattr(lora_module, "lora_packed_group",
                        lambda *a, **k: traced.append(len(a[1])) or lora_packed_group(*a, **k))
    common = dict(max_batch=8, max_model_len=64, max_num_batched_tokens=64, max_lora_rank=16, kernels="pallas")
    default = LLM(str(ck["dir"]), adapters, dtype="float32", engine=EngineConfig(**common))
    packed = LLM(str(ck["dir"]), adapters, dtype="float32",
                 engine=EngineConfig(**common, decode_lora_tile=1, decode_lora_tiling=PACKED))
    prompts = [rng.integers(3, default.config.vocab_size, n).tolist() for n in (5, 17, 9, 12, 7)]
    names = ["r8_all_rslora", "r4_qv", "r8_all_rslora", None, "r4_qv"]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in default.generate(prompts, names, greedy)]
    assert [o.token_ids for o in packed.generate(prompts, names, greedy)] == want
    assert 3 in traced and 1 in traced   # q, k, v as one group, and o
    # the adapters change the tokens: the test sees the LoRA path, not only the base model
    assert want != [o.token_ids for o in default.generate(prompts, [None] * 5, greedy)]
