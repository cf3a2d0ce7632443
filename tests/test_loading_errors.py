"""Every adapter or checkpoint this server cannot serve raises a clear error naming the file and field."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jslora import AdapterError, ModelConfig
from jslora.config import HF_MODULE_NAMES
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


@pytest.mark.parametrize("which", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(mha, tmp_path, which):
    """A tenant's directory holding a named pipe where a file should be: opening it would block the
    reader until someone writes to it (a loader, or a registration, stuck for good). Refused at once,
    eagerly and lazily."""
    import os

    from jslora.loading.peft_adapter import peft_adapter_ranks

    ckpt, cfg = mha
    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "fifo")
    (bad / which).unlink()
    os.mkfifo(bad / which)
    for read in (load_peft_adapter, peft_adapter_ranks):
        with pytest.raises(AdapterError, match=f"{which}: not a regular file"):
            read(bad, cfg, max_rank=64)


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


def write_config(directory, text: str):
    (directory / "adapter_config.json").write_text(text)
    return directory


# every one of these once escaped as a 500 (or was accepted): each must be an AdapterError naming the field
MALFORMED_CONFIGS = [
    ("[1, 2]", "JSON object"), ("null", "JSON object"), ("42", "JSON object"), ('"s"', "JSON object"),
    ('{"r": 4, "lora_alpha": null, "target_modules": ["q_proj", "v_proj"]}', "lora_alpha"),
    ('{"r": null, "lora_alpha": 8}', "'r'"),
    ('{"r": "eight", "lora_alpha": 8}', "'r'"),
    ('{"r": true, "lora_alpha": 8}', "'r'"),
    ('{"r": 4, "lora_alpha": NaN}', "lora_alpha"),
    ('{"r": 4, "lora_alpha": Infinity}', "lora_alpha"),
    ('{"r": 4, "lora_alpha": 8, "rank_pattern": [1]}', "rank_pattern"),
    ('{"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": null}}', "alpha_pattern"),
    ('{"r": 4, "lora_alpha": 8, "alpha_pattern": {"(": 2}}', "alpha_pattern"),
    ('{"r": 4, "lora_alpha": 8, "peft_type": 5}', "peft_type"),
    ('{"r": 4, "lora_alpha": 8, "fan_in_fan_out": true}', "fan_in_fan_out"),
    ('{"r": 4, "lora_alpha": 8, "layers_to_transform": [99]}', "layers_to_transform"),
    ('{"r": 4, "lora_alpha": 8, "layers_to_transform": [-1]}', "layers_to_transform"),
    ('{"r": 4, "lora_alpha": 8, "layers_to_transform": "zero"}', "layers_to_transform"),
    ('{"r": 4, "lora_alpha": 8, "layers_to_transform": [0]}', "layers_to_transform"),  # tensors for layer 1 too
    ('{"r": 4, "lora_alpha": 8, "use_rslora": "yes"}', "use_rslora"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": [1]}', "target_modules"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize("text, field", MALFORMED_CONFIGS, ids=[f"config{i}" for i in range(len(MALFORMED_CONFIGS))])
def test_malformed_configs_name_file_and_field(mha, tmp_path, text, field):
    ckpt, cfg = mha
    bad = write_config(edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "bad"), text)
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(bad, cfg, max_rank=64)
    assert "adapter_config.json" in str(err.value) or "adapter_model.safetensors" in str(err.value)
    assert field in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v.astype(np.int32) for k, v in t.items()}, "int32"),
    (lambda t: {k: np.full_like(v, np.nan) for k, v in t.items()}, "NaN or infinite"),
    (lambda t: {k: np.where(np.arange(v.size).reshape(v.shape) == 3, np.inf, v).astype(v.dtype)
                for k, v in t.items()}, "NaN or infinite"),
    (lambda t: {k: np.asarray(v.ravel()[0]) for k, v in t.items()}, "do not match"),      # 0-d tensors
    (lambda t: {k: v[:, :-1] for k, v in t.items()}, "do not match"),
])
def test_bad_tensors_are_refused(mha, tmp_path, edit, message):
    ckpt, cfg = mha
    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "bad", tensor_edit=edit)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(bad, cfg, max_rank=64)


def test_alpha_that_overflows_the_scaled_weights_is_refused(mha, tmp_path):
    ckpt, cfg = mha
    bad = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path / "bad", config_edit={"lora_alpha": 1e308})
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_peft_adapter(bad, cfg, max_rank=64)


def test_any_json_config_loads_or_raises_adapter_error(mha, tmp_path_factory):
    """Property: whatever JSON a tenant writes into adapter_config.json, loading ends in an adapter or
    an AdapterError, never another exception."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ckpt, cfg = mha
    directory = edited_copy(ckpt["adapters"]["r4_qv"], tmp_path_factory.mktemp("prop") / "a")
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    anything = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=3), max_leaves=8)
    fields = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type", "use_rslora",
              "layers_to_transform", "fan_in_fan_out", "bias", "use_dora", "modules_to_save", "lora_bias"]
    configs = st.fixed_dictionaries({}, optional={f: anything for f in fields}) | anything

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(configs)
    def check(config):
        (directory / "adapter_config.json").write_text(json.dumps(config))
        try:
            load_peft_adapter(directory, cfg, max_rank=64)
        except AdapterError:
            pass

    check()


def test_a_lazily_registered_directory_is_read_on_first_use(tmp_path):
    """AdapterStore.register(lazy=True) checks a PEFT directory's config and header only: the entry is
    the one an eager registration makes and its first use reads the same pages; a file whose weights
    are NaN registers, and fails (with why) when first read, not before."""
    from jslora.bench.adapter_files import write_peft_adapters
    from jslora.engine.adapter_store import AdapterStore
    from jslora.parallel.lora_partition import LoraPartition
    from pallas_kernels.pool import PoolLayout

    cfg = ModelConfig.named("tiny")
    paths = write_peft_adapters(tmp_path, {"good": 8, "bad": 4}, cfg, progress=False)
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    save_file({k: np.full_like(v, np.nan) for k, v in load_file(str(weights)).items()}, str(weights))
    partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 64, cfg.num_kv_heads * cfg.head_dim), 1, 16)
    store = AdapterStore(cfg, partition, 16, np.float32, host_bytes=1 << 30)
    eager, _ = store.register("eager", paths["good"])
    lazy, _ = store.register("lazy", paths["good"], lazy=True)
    assert (lazy.ranks, lazy.num_pages) == (eager.ranks, eager.num_pages) and lazy.ranks
    assert store.is_on_host(eager) and not store.is_on_host(lazy)
    np.testing.assert_array_equal(store.host_copy(lazy).page_data, store.host_copy(eager).page_data)
    assert store.source_loads == 1
    with pytest.raises(AdapterError, match="NaN"):
        store.register("bad-eager", paths["bad"])
    bad, _ = store.register("bad", paths["bad"], lazy=True)
    with pytest.raises(AdapterError, match="NaN"):
        store.host_copy(bad)
    assert "NaN" in store.load_error(bad)
    small = AdapterStore(cfg, LoraPartition(cfg, partition.local_layout, 1, 4), 4, np.float32, host_bytes=1 << 30)
    with pytest.raises(AdapterError, match="rank 8 .* is above the configured maximum"):  # the header's checks
        small.register("too-big", paths["good"], lazy=True)


def test_reading_an_adapter_in_the_pools_dtype_packs_the_same_pages(checkpoints):
    """The host tier reads PEFT weights straight into the pool's dtype (one rounding, packing a plain
    copy): the pages equal those of the float32 read packed into that dtype, for every fixture adapter
    (rank and alpha patterns, rsLoRA, one layer only, GQA and MHA shapes)."""
    import ml_dtypes

    from jslora.parallel.lora_partition import LoraPartition
    from pallas_kernels.pool import PoolLayout

    for ck in checkpoints.values():
        cfg = ModelConfig.from_file(ck["dir"] / "config.json")
        partition = LoraPartition(cfg, PoolLayout(cfg.num_layers, 256, cfg.num_kv_heads * cfg.head_dim), 1, 16)
        for name, path in ck["adapters"].items():
            pages = {}
            for dtype in (np.float32, ml_dtypes.bfloat16):
                adapter = load_peft_adapter(path, cfg, 16, dtype=dtype)
                ranks = {t: a.shape[-1] for t, (a, _) in adapter.weights.items()}
                out = np.zeros((cfg.num_layers, partition.pages_needed(ranks), partition.local_layout.page_width),
                               ml_dtypes.bfloat16)
                pages[dtype] = partition.pack(adapter.weights, np.arange(out.shape[1]), out=out)[0]
            assert pages[np.float32].view(np.uint16).any(), name
            np.testing.assert_array_equal(pages[np.float32].view(np.uint16), pages[ml_dtypes.bfloat16].view(np.uint16))


def assert_read_equals_tensors(path, cfg, tensors: dict, max_rank: int = 16) -> None:
    """load_peft_adapter(path) equals A and scaled B taken tensor by tensor from `tensors` (the file's)."""
    import json as json_
    import math

    config = json_.loads((path / "adapter_config.json").read_text())
    got = load_peft_adapter(path, cfg, max_rank=max_rank)
    for key, a_file in tensors.items():
        if ".lora_A." not in key:
            continue
        layer = int(key.split(".layers.")[1].split(".")[0])
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        target = next(t for t, hf in HF_MODULE_NAMES.items() if module.endswith(f".{hf}"))
        r = a_file.shape[0]
        alpha = next((v for k, v in config.get("alpha_pattern", {}).items() if module.endswith(k)),
                     config["lora_alpha"])
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        b_file = tensors[key.replace(".lora_A.", ".lora_B.")]
        a, b = got.weights[target]
        np.testing.assert_array_equal(a[layer, :, :r], np.asarray(a_file, np.float32).T, err_msg=key)
        np.testing.assert_array_equal(b[layer, :r], np.asarray(b_file, np.float32).T * np.float32(scale), err_msg=key)


@pytest.mark.parametrize("rewrite", [None, "bfloat16", "float16_mixed"])
def test_the_one_call_read_equals_reading_tensor_by_tensor(checkpoints, tmp_path, rewrite):
    """load_peft_adapter reads the file once and gathers each target's layers together: every fixture
    adapter (rank and alpha patterns, rsLoRA, one layer only) equals A and scaled B taken tensor by
    tensor, also re-saved in bfloat16, and with A and B in different dtypes."""
    import ml_dtypes

    for model, ck in checkpoints.items():
        cfg = ModelConfig.from_file(ck["dir"] / "config.json")
        for name, path in ck["adapters"].items():
            tensors = load_file(f"{path}/adapter_model.safetensors")
            if rewrite is not None:
                path = edited_copy(path, tmp_path / f"{rewrite}_{model}_{name}")
                cast = (lambda k: ml_dtypes.bfloat16) if rewrite == "bfloat16" else (
                    lambda k: np.float16 if ".lora_A." in k else np.float32)
                tensors = {k: v.astype(cast(k)) for k, v in tensors.items()}
                save_file(tensors, path / "adapter_model.safetensors")
            assert_read_equals_tensors(path, cfg, tensors)


@pytest.mark.parametrize("odd_layer", [None, 5])
def test_the_one_call_read_puts_many_layers_in_order(tmp_path, odd_layer):
    """12 layers: the file holds them in name order (layers.0, layers.1, layers.10, layers.11, layers.2,
    ...), so a target's evenly spaced layers come back through a permutation (one strided view); with a
    rank_pattern giving q's layer 5 another rank, the layers are unevenly spaced (an index gather)."""
    import dataclasses
    import json as json_

    cfg = dataclasses.replace(ModelConfig.named("tiny"), num_layers=12)
    rng = np.random.default_rng(1)
    tensors = {}
    for layer in range(12):
        for hf, (fan_in, fan_out) in (("q_proj", cfg.module_shape("q")), ("v_proj", cfg.module_shape("v"))):
            r = 4 if (hf, layer) == ("q_proj", odd_layer) else 8
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{hf}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, r)).astype(np.float32)
    path = tmp_path / "twelve"
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "alpha_pattern": {"layers.7.self_attn.v_proj": 4}}
    if odd_layer is not None:
        config["rank_pattern"] = {f"model.layers.{odd_layer}.self_attn.q_proj": 4}
    (path / "adapter_config.json").write_text(json_.dumps(config))
    assert_read_equals_tensors(path, cfg, tensors)


def test_the_one_call_read_takes_unaligned_tensors(checkpoints, tmp_path):
    """A file whose header length leaves its float32 tensors off their alignment (safetensors' writer
    pads the header to 8 bytes; a tenant's file need not): read tensor by tensor, the same weights."""
    import json as json_
    import struct

    ck = checkpoints["mha"]
    cfg = ModelConfig.from_file(ck["dir"] / "config.json")
    path = edited_copy(ck["adapters"]["r8_all_rslora"], tmp_path / "unaligned")
    tensors = load_file(path / "adapter_model.safetensors")
    header, offset, blobs = {}, 0, []
    for key, value in tensors.items():
        data = np.ascontiguousarray(value, np.float32).tobytes()
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json_.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8 + 2)  # 2 bytes past alignment: no float32 starts on 4 bytes
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    assert_read_equals_tensors(path, cfg, load_file(path / "adapter_model.safetensors"))
