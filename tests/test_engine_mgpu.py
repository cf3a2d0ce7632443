"""The engine with its decode LoRA on the Mosaic GPU kernels (decode_lora_tiling {"mgpu": true}, one-row tiles),
in Mosaic GPU's interpret mode: a model wide enough for them (hidden 128 = one TMA block), greedy tokens equal
to the default engine's over a batch mixing adapters and rows without one."""
from __future__ import annotations

import pytest
from conftest import ADAPTER_SPECS, build_adapter, build_tokenizer

from jslora import LLM, SamplingParams
from jslora.engine.config import EngineConfig
from pallas_kernels import lora as lora_module
from pallas_kernels.lora_shrink_mgpu import lora_shrink_mgpu


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    tokenizer = build_tokenizer(root / "tokenizer")
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer) + 20, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.08)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = {}
    for seed, name in enumerate(("r4_qv", "r8_all_rslora")):
        assert name in ADAPTER_SPECS
        build_adapter(model, name, root / name, seed)
        adapters[name] = str(root / name)
    return str(root / "model"), adapters


def test_mgpu_decode_lora_gives_the_default_engines_tokens(wide_checkpoint, rng, monkeypatch):
    model, adapters = wide_checkpoint
    traced = []   # the engine's steps trace the Mosaic GPU shrink: no silent fall-back to the Triton kernels
    monkeypatch.setattr(lora_module, "lora_shrink_mgpu",
                        lambda *a, **k: traced.append(a[0].shape) or lora_shrink_mgpu(*a, **k))
    common = dict(max_batch=8, max_model_len=64, max_num_batched_tokens=64, max_lora_rank=16, kernels="pallas")
    default = LLM(model, adapters, dtype="float32", engine=EngineConfig(**common))
    mgpu = LLM(model, adapters, dtype="float32",
               engine=EngineConfig(**common, decode_lora_tile=1,
                                   decode_lora_tiling={"mgpu": True, "mgpu_block": 128, "mgpu_stages": 2}))
    vocab = default.config.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 17, 9, 12)]
    names = ["r8_all_rslora", "r4_qv", "r8_all_rslora", None]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in default.generate(prompts, names, greedy)]
    assert [o.token_ids for o in mgpu.generate(prompts, names, greedy)] == want
    assert traced
    # the adapters change the tokens: the test sees the LoRA path, not only the base model
    assert want != [o.token_ids for o in default.generate(prompts, [None] * 4, greedy)]
