"""Tiny real checkpoints and adapters, written by transformers' and peft's own save_pretrained."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# four CPU devices for the tensor-parallel tests (before jax starts; device 0 serves everything else)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI time is XLA's CPU compiler (~70% of the suite): engines whose test is not about the Pallas kernels run
# on the plain-jnp backend (the same tile tables and pool, ~45% less to compile); the model oracles,
# chunked prefill, tenant isolation, test_engine's main fixture and every tensor-parallel test ask for
# kernels="pallas" (tests/kernels/ calls the kernels directly). LLVM's optimizer is off (-25% compile):
# these tiny programs run in microseconds either way.
os.environ.setdefault("JSLORA_KERNELS", "reference")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "serving thousands of concurrent lora adapters from one gpu",
    "unified paging keeps the kv cache and adapter weights in one pool",
    "a tiny tokenizer for tiny test models, built with the tokenizers library",
    "hello world! how are you today? 0123456789",
]

# name -> peft LoraConfig arguments; different ranks, targets (MLP too), rsLoRA and patterns
ADAPTER_SPECS = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_all_rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "r16_mlp_patterns": dict(r=16, lora_alpha=32, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
                             rank_pattern={"down_proj": 6}, alpha_pattern={"gate_proj": 5}),
    "r2_layer0_k": dict(r=2, lora_alpha=3, target_modules=["k_proj", "up_proj"], layers_to_transform=[0]),
}


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def _randomize(model, seed: int):
    """Random, non-zero weights everywhere (norms included), large enough that logits are well apart."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(p + torch.randn(p.shape, generator=gen) * 0.08)


def build_model(kind: str, out_dir: Path, vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=vocab_size, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, initializer_range=0.1)
    if kind == "mha":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-6, **common)
        model_cls = LlamaForCausalLM
    elif kind == "gqa":
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                             num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                             rope_theta=10000.0, **common)
        model_cls = LlamaForCausalLM
    elif kind == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=False, **common)
        model_cls = Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32).eval()
    _randomize(model, seed=len(kind))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def build_adapter(base_model, name: str, out_dir: Path, seed: int):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base_model),
                                LoraConfig(init_lora_weights=False, **ADAPTER_SPECS[name]))
    peft_model.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """{kind: {"dir": model dir, "adapters": {name: dir}}} for kinds mha, gqa (Llama-3 rope), qwen2 (bias)."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = build_tokenizer(root / "tokenizer")
    vocab = len(tokenizer) + 20  # a few ids the tokenizer never produces, as in real checkpoints
    out = {}
    for kind in ("mha", "gqa", "qwen2"):
        model_dir = root / kind
        model = build_model(kind, model_dir, vocab)
        tokenizer.save_pretrained(model_dir)
        adapters = {}
        for seed, name in enumerate(ADAPTER_SPECS):
            adapters[name] = root / f"{kind}-{name}"
            build_adapter(model, name, adapters[name], seed)
        out[kind] = {"dir": model_dir, "adapters": adapters}
    return out


@pytest.fixture
def rng():
    # Fresh inputs every run; the seed is printed so a failure can be replayed (JSLORA_TEST_SEED=<seed>).
    seed = int(os.environ.get("JSLORA_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoints):
    """The demo server (tests/serving.py), shared by every server test module."""
    from serving import start_demo_server

    root = tmp_path_factory.mktemp("lora-root")
    proc, base = start_demo_server(root, tmp_path_factory.mktemp("logs") / "server.log", checkpoints)
    yield {"base": base, "root": root}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001 - a hung server is killed
        proc.kill()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    from serving import API_KEY

    return OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def local_llm():
    """The demo model in-process: greedy outputs must match the server's."""
    from jslora import LLM

    from serving import DEMO_ADAPTERS

    return LLM("dummy:tiny", DEMO_ADAPTERS, max_lora_rank=16, max_model_len=256,
               engine=dict(max_batch=32, num_pages=8192, max_num_batched_tokens=256))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_steps():
    """Drop the compiled executables of a module's engines when it ends: each engine's steps compile
    a few dozen variants, and a whole session's worth held at once ran the CPU compiler out of memory."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
