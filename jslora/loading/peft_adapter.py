"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors) and dummy adapters.

An adapter is held on the host as, per target projection, A [L, in, r] and B [L, r, out] in float32,
with the PEFT scale (lora_alpha / r, or / sqrt(r) with rsLoRA; per module through alpha_pattern) folded
into B. Layers an adapter does not touch (layers_to_transform) hold zeros.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import numpy as np

from jslora.config import HF_MODULE_NAMES, LORA_TARGETS, ModelConfig
from jslora.loading.safetensors_io import TensorReader

_TARGET_OF_HF = {hf: ours for ours, hf in HF_MODULE_NAMES.items()}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter this server cannot serve; the message names the file and the field."""


@dataclasses.dataclass
class LoraAdapter:
    name: str
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # target -> (A [L, in, r], B [L, r, out])
    source: str | None = None

    @property
    def rank(self) -> int:
        return max(a.shape[-1] for a, _ in self.weights.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in LORA_TARGETS if t in self.weights)

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _pattern_value(patterns: dict, module_name: str, default):
    # the same suffix match PEFT applies to rank_pattern and alpha_pattern keys
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _check_config(config: dict, config_file: Path, cfg: ModelConfig) -> None:
    def fail(field, why):
        raise AdapterError(f"{config_file}: field {field!r}: {why}")

    if config.get("peft_type", "LORA").upper() != "LORA":
        fail("peft_type", f"{config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        fail("use_dora", "DoRA adapters are not supported")
    if config.get("modules_to_save"):
        fail("modules_to_save", f"{config['modules_to_save']} would replace base-model modules; not supported")
    if config.get("bias", "none") != "none":
        fail("bias", f"{config['bias']!r}: adapters that train biases are not supported (need 'none')")
    if config.get("lora_bias"):
        fail("lora_bias", "LoRA bias (a bias on lora_B) is not supported")
    for field in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if config.get(field):
            fail(field, "not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        model_modules = sorted(HF_MODULE_NAMES.values())
        for t in targets:
            if t.split(".")[-1] not in _TARGET_OF_HF:
                fail("target_modules", f"{t!r} is not a module of this model ({cfg.name}); "
                                       f"it has {model_modules}")


def load_peft_adapter(path: str | Path, cfg: ModelConfig, max_rank: int, name: str | None = None) -> LoraAdapter:
    path = Path(path)
    config_file = path / "adapter_config.json"
    weights_file = path / "adapter_model.safetensors"
    if not config_file.exists():
        raise AdapterError(f"{config_file}: not found (not a PEFT adapter directory)")
    if not weights_file.exists():
        raise AdapterError(f"{weights_file}: not found (only safetensors adapters are read)")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    _check_config(config, config_file, cfg)

    alpha = float(config.get("lora_alpha", 8))
    default_rank = int(config.get("r", 8))
    use_rslora = bool(config.get("use_rslora", False))

    try:
        reader = TensorReader([weights_file])
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise AdapterError(f"{weights_file}: cannot be read ({e})") from None
    pieces: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    with reader:
        for key in reader.keys():
            match = _KEY.match(key)
            if not match:
                raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA weight of a "
                                   f"{'/'.join(HF_MODULE_NAMES.values())} projection of this model")
            layer, _, hf_module, which = int(match[1]), match[2], match[3], match[4]
            if hf_module not in _TARGET_OF_HF:
                raise AdapterError(f"{weights_file}: tensor {key!r}: target module {hf_module!r} "
                                   f"is not a module of this model ({cfg.name})")
            if layer >= cfg.num_layers:
                raise AdapterError(f"{weights_file}: tensor {key!r}: layer {layer} but the model "
                                   f"has {cfg.num_layers} layers")
            pieces.setdefault((_TARGET_OF_HF[hf_module], layer), {})[which] = reader.get(key)
    if not pieces:
        raise AdapterError(f"{weights_file}: holds no LoRA weights")

    ranks: dict[str, int] = {}
    for (target, layer), ab in sorted(pieces.items()):
        module_name = f"model.layers.{layer}.{'mlp' if target in ('gate', 'up', 'down') else 'self_attn'}." \
                      f"{HF_MODULE_NAMES[target]}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: {module_name} has lora_{'A' if 'A' in ab else 'B'} "
                               f"but not its pair")
        fan_in, fan_out = cfg.module_shape(target)
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterError(
                f"{weights_file}: {module_name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                f"not match the model ({cfg.name}) which needs ({'r'}, {fan_in}) and ({fan_out}, r)")
        expected = int(_pattern_value(config.get("rank_pattern"), module_name, default_rank))
        if r != expected:
            raise AdapterError(f"{config_file}: field 'r'/'rank_pattern' gives rank {expected} for "
                               f"{module_name} but {weights_file} holds rank {r}")
        if r > max_rank:
            raise AdapterError(f"{config_file}: field 'r': rank {r} ({module_name}) is above the "
                               f"configured maximum LoRA rank {max_rank}")
        ranks[target] = max(ranks.get(target, 0), r)
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), module_name, alpha))
        scale = module_alpha / (math.sqrt(r) if use_rslora else r)
        ab["scaled"] = (a.T.astype(np.float32), (b.T * scale).astype(np.float32))

    weights = {}
    for target, r in ranks.items():
        fan_in, fan_out = cfg.module_shape(target)
        a_all = np.zeros((cfg.num_layers, fan_in, r), np.float32)
        b_all = np.zeros((cfg.num_layers, r, fan_out), np.float32)
        for layer in range(cfg.num_layers):
            if (target, layer) in pieces:
                a, b = pieces[(target, layer)]["scaled"]
                a_all[layer, :, : a.shape[1]] = a
                b_all[layer, : b.shape[0]] = b
        weights[target] = (a_all, b_all)
    return LoraAdapter(name=name or path.name, weights=weights, source=str(path))


@functools.lru_cache(maxsize=64)
def _dummy_factors(num_layers: int, fan_in: int, fan_out: int, rank: int, base_seed: int):
    rng = np.random.default_rng(base_seed)
    a = rng.standard_normal((num_layers, fan_in, rank), np.float32)
    b = rng.standard_normal((num_layers, rank, fan_out), np.float32)
    return a, b


def dummy_adapter(cfg: ModelConfig, rank: int, targets=("q", "k", "v", "o"), seed: int = 0,
                  name: str | None = None, std: float | None = None) -> LoraAdapter:
    """A random adapter (both A and B non-zero) for benchmarks and demos. Thousands of them are made
    on demand, so each is a cached random pair (A, B) per shape with its own random sign per rank
    column and layer: cheap to make, and different from every other adapter."""
    rng = np.random.default_rng(seed)
    weights = {}
    for target in targets:
        if target not in LORA_TARGETS:
            raise AdapterError(f"dummy adapter: target {target!r} is not one of {LORA_TARGETS}")
        fan_in, fan_out = cfg.module_shape(target)
        a, b = _dummy_factors(cfg.num_layers, fan_in, fan_out, rank, LORA_TARGETS.index(target))
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), (cfg.num_layers, 1, rank))
        a = a * (signs * (std or fan_in ** -0.5))
        b = b * (np.swapaxes(signs, 1, 2) * rng.uniform(0.5, 1.5, (cfg.num_layers, rank, 1)).astype(np.float32)
                 * ((std or rank ** -0.5) * 0.1))
        weights[target] = (a, b)
    return LoraAdapter(name=name or f"dummy-r{rank}-{seed}", weights=weights)
