"""The functional Llama + reference LoRA against transformers + peft (CPU, float32)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ADAPTER_SPECS

from jslora import LLM, SamplingParams
from jslora.model import llama
from jslora.model.lora import stack_adapters

ADAPTERS = list(ADAPTER_SPECS)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(ours).all()
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def hf_peft(ckpt, names):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ckpt["dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, ckpt["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(ckpt["adapters"][name], adapter_name=name)
    return model.eval()


def our_logits(llm: LLM, tokens: np.ndarray, row_adapters: list[str | None]):
    used = [a for a in ADAPTERS if a in row_adapters]
    banks = stack_adapters([llm.adapter_weights(a) for a in used], llm.config, jnp.float32)
    ids = jnp.asarray([used.index(a) if a else -1 for a in row_adapters], jnp.int32)
    cache = llama.init_kv_cache(llm.config, tokens.shape[0], 64, jnp.float32)
    logits, _ = llama.prefill(llm.params, llm.config, jnp.asarray(tokens), cache, banks, ids)
    return logits


@pytest.fixture(scope="module")
def models(checkpoints):
    return {kind: (LLM(str(c["dir"]), {n: str(p) for n, p in c["adapters"].items()}, dtype="float32",
                       engine=dict(kernels="pallas")),
                   hf_peft(c, ADAPTERS)) for kind, c in checkpoints.items()}


@pytest.mark.parametrize("kind", ["mha", "gqa", "qwen2"])
def test_mixed_batch_logits_match_peft(models, kind, rng):
    llm, ref_model = models[kind]
    row_adapters = ADAPTERS + [None, ADAPTERS[1]]
    tokens = rng.integers(3, llm.config.vocab_size, size=(len(row_adapters), 13)).astype(np.int32)
    ours = our_logits(llm, tokens, row_adapters)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(tokens).long(),
                        adapter_names=[a or "__base__" for a in row_adapters]).logits.numpy()
    assert rel_err(ours, ref) < 1e-4
    # every adapter really changes the output (a silently ignored adapter would pass the check above)
    with torch.no_grad(), ref_model.disable_adapter():
        base = ref_model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    for row, name in enumerate(row_adapters):
        diff = rel_err(base[row], ref[row])
        assert (diff > 1e-3) if name else (diff < 1e-6), (name, diff)


def test_decode_steps_match_prefill(models, rng):
    """Prefill a prefix, then decode token by token through the cache: same logits as one prefill."""
    llm, _ = models["gqa"]
    row_adapters = [ADAPTERS[0], None, ADAPTERS[2]]
    tokens = rng.integers(3, llm.config.vocab_size, size=(3, 11)).astype(np.int32)
    full = np.asarray(our_logits(llm, tokens, row_adapters))
    used = [a for a in ADAPTERS if a in row_adapters]
    banks = stack_adapters([llm.adapter_weights(a) for a in used], llm.config, jnp.float32)
    ids = jnp.asarray([used.index(a) if a else -1 for a in row_adapters], jnp.int32)
    cache = llama.init_kv_cache(llm.config, 3, 32, jnp.float32)
    prefix = 6
    logits, cache = llama.prefill(llm.params, llm.config, jnp.asarray(tokens[:, :prefix]), cache, banks, ids)
    steps = [np.asarray(logits)]
    for pos in range(prefix, tokens.shape[1]):
        step_logits, cache = llama.decode(llm.params, llm.config, jnp.asarray(tokens[:, pos]),
                                          jnp.full((3,), pos, jnp.int32), cache, banks, ids)
        steps.append(np.asarray(step_logits)[:, None])
    assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_greedy_generation_matches_peft(models, kind, rng):
    llm, ref_model = models[kind]
    row_adapters = [ADAPTERS[0], ADAPTERS[1], None, ADAPTERS[2], ADAPTERS[3]]
    prompts = [rng.integers(3, llm.config.vocab_size, size=int(n)).tolist()
               for n in rng.integers(1, 20, size=len(row_adapters))]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, adapter=row_adapters, sampling=greedy)
    for prompt, name, out in zip(prompts, row_adapters, outputs):
        with torch.no_grad():
            ref = ref_model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name or "__base__"],
                                     max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist(), name
        assert out.finish_reason == "length"


def test_text_prompt_uses_the_checkpoint_tokenizer(models, checkpoints):
    from transformers import AutoTokenizer

    llm, _ = models["mha"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["mha"]["dir"])
    prompt = "the lazy fox serves lora adapters"
    out = llm.generate(prompt, adapter=ADAPTERS[1], sampling=SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.prompt_token_ids == tokenizer.encode(prompt)
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_sharded_checkpoint_loads_the_same_weights(checkpoints, tmp_path):
    """A checkpoint saved in shards (model.safetensors.index.json) by transformers' own save_pretrained
    loads the same weights as the single-file one."""
    import jax
    from transformers import AutoModelForCausalLM

    from jslora import ModelConfig
    from jslora.loading.checkpoint import load_hf_params

    src = checkpoints["gqa"]["dir"]
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg = ModelConfig.from_file(src / "config.json")
    single = load_hf_params(src, cfg, dtype=jnp.float32)
    sharded = load_hf_params(tmp_path, cfg, dtype=jnp.float32)
    assert jax.tree_util.tree_structure(single) == jax.tree_util.tree_structure(sharded)
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_projections_compute_what_the_separate_ones_do(checkpoints, groups, rng):
    """fuse_projections (q,k,v -> qkv, gate,up -> gate_up, in tensor-parallel groups) changes no logit,
    and add_to_projection (the merged baseline) adds a delta to the right columns of a fused weight."""
    from jslora.config import ModelConfig
    from jslora.loading.checkpoint import load_hf_params

    cfg = ModelConfig.from_file(checkpoints["qwen2"]["dir"] / "config.json")  # GQA and q,k,v biases
    plain = llama.unstack_layers(load_hf_params(checkpoints["qwen2"]["dir"], cfg, jnp.float32))
    fused = llama.fuse_projections({**plain, "layers": [dict(lp) for lp in plain["layers"]]}, cfg, groups)
    assert "qkv" in fused["layers"][0] and "q" not in fused["layers"][0] and "q" in plain["layers"][0]
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 9)), jnp.int32)

    def logits(params):
        return llama.prefill(params, cfg, tokens, llama.init_kv_cache(cfg, 2, 16, jnp.float32))[0]

    assert rel_err(logits(fused), logits(plain)) < 1e-6
    for name in ("k", "up"):
        delta = jnp.asarray(rng.normal(size=cfg.module_shape(name)) * 0.05, jnp.float32)
        for params in (plain, fused):
            llama.add_to_projection(params["layers"][1], cfg, name, delta)
    changed = logits(plain)
    assert rel_err(logits(fused), changed) < 1e-6 and rel_err(changed, logits(llama.fuse_projections(
        llama.unstack_layers(load_hf_params(checkpoints["qwen2"]["dir"], cfg, jnp.float32)), cfg))) > 1e-3
