"""Every adapter or checkpoint this server cannot serve raises a clear error naming the file and field."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jslora import AdapterError, ModelConfig
from jslora.loading.checkpoint import load_hf_params
from jslora.loading.peft_adapter import load_peft_adapter


@pytest.fixture
def mha(checkpoints):
    return checkpoints["mha"], ModelConfig.from_file(checkpoints["mha"]["dir"] / "config.json")


def edited_copy(src, dst, config_edit=None, tensor_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        path = dst / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(config_edit)
        path.write_text(json.dumps(config))
    if tensor_edit:
        path = dst / "adapter_model.safetensors"
        save_file(tensor_edit(load_file(path)), path)
    return dst


@pytest.mark.parametrize("edit, field", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"target_modules": ["q_proj", "fc1"]}, "target_modules"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 5}, "rank_pattern"),
])
def test_unsupported_config_fields(mha, tmp_path, edit, field):
    ckpt, cfg = mha
    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "bad", config_edit=edit)
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(bad, cfg, max_rank=64)
    assert "adapter_config.json" in str(err.value) and field in str(err.value)


def test_rank_above_maximum(mha):
    ckpt, cfg = mha
    with pytest.raises(AdapterError, match=r"adapter_config.json: field 'r': rank 16 .* maximum LoRA rank 8"):
        load_peft_adapter(ckpt["adapters"]["r16_mlp_patterns"], cfg, max_rank=8)


def test_shapes_of_another_model(checkpoints, mha):
    _, cfg = mha  # an adapter trained on the GQA model: its k_proj is 16 wide, the MHA model's 64
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: .*k_proj.* do not match the model"):
        load_peft_adapter(checkpoints["gqa"]["adapters"]["r2_layer0_k"], cfg, max_rank=64)


def test_weights_for_a_module_the_model_lacks(mha, tmp_path):
    ckpt, cfg = mha

    def rename(tensors):
        return {k.replace("q_proj", "fc1"): v for k, v in tensors.items()}

    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "bad", tensor_edit=rename)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor .*fc1.*not a module of this model"):
        load_peft_adapter(bad, cfg, max_rank=64)


def test_layer_out_of_range(mha, tmp_path):
    ckpt, cfg = mha

    def shift(tensors):
        return {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}

    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "bad", tensor_edit=shift)
    with pytest.raises(AdapterError, match="layer 7 but the model has 2 layers"):
        load_peft_adapter(bad, cfg, max_rank=64)


def test_missing_and_corrupt_files(mha, tmp_path):
    ckpt, cfg = mha
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        load_peft_adapter(tmp_path, cfg, max_rank=64)
    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "corrupt")
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: cannot be read"):
        load_peft_adapter(bad, cfg, max_rank=64)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_peft_adapter(bad, cfg, max_rank=64)


def test_checkpoint_shape_mismatch_names_the_tensor(mha, tmp_path):
    ckpt, cfg = mha
    wrong = ModelConfig(**{**cfg.__dict__, "intermediate_size": cfg.intermediate_size + 1})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight'"):
        load_hf_params(ckpt["dir"], wrong)


def test_rank_and_alpha_patterns_are_applied(mha):
    ckpt, cfg = mha
    adapter = load_peft_adapter(ckpt["adapters"]["r16_mlp_patterns"], cfg, max_rank=64)
    assert adapter.weights["down"][0].shape[-1] == 6  # rank_pattern
    assert adapter.weights["gate"][0].shape[-1] == 16
    raw = load_file(ckpt["adapters"]["r16_mlp_patterns"] / "adapter_model.safetensors")
    b_gate = raw["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"]
    np.testing.assert_allclose(adapter.weights["gate"][1][0], b_gate.T * 5 / 16, rtol=1e-6)  # alpha_pattern
    only_layer0 = load_peft_adapter(ckpt["adapters"]["r2_layer0_k"], cfg, max_rank=64)
    assert np.abs(only_layer0.weights["k"][0][1]).max() == 0 and np.abs(only_layer0.weights["k"][0][0]).max() > 0
