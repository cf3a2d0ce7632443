"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors) and dummy adapters.

An adapter is held on the host as, per target projection, A [L, in, r] and B [L, r, out] in float32,
with the PEFT scale (lora_alpha / r, or / sqrt(r) with rsLoRA; per module through alpha_pattern) folded
into B. Layers an adapter does not touch (layers_to_transform) hold zeros.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from jslora.config import HF_MODULE_NAMES, LORA_TARGETS, ModelConfig
from jslora.loading.safetensors_io import TensorReader

_TARGET_OF_HF = {hf: ours for ours, hf in HF_MODULE_NAMES.items()}
_INTEGER_DTYPES = {f"{k}{b}": f"{n}{b}" for k, n in (("I", "int"), ("U", "uint")) for b in (8, 16, 32, 64)} | {
    "BOOL": "bool"}  # safetensors' dtype names, as numpy names them
_MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes
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


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The fields of adapter_config.json this server reads, checked for type and range."""
    rank: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    layers: tuple[int, ...] | None   # layers_to_transform (None: every layer)


def _read_config(config_file: Path, cfg: ModelConfig) -> PeftConfig:
    """adapter_config.json parsed and checked: any file a tenant can write gets an AdapterError naming
    the file and the field, never another exception."""
    def fail(field, why):
        raise AdapterError(f"{config_file}: field {field!r}: {why}")

    try:
        with open(config_file, "rb") as f:
            config = json.loads(f.read(_MAX_CONFIG_BYTES + 1))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(f"{config_file}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: must hold a JSON object, not {type(config).__name__}")

    def number(field, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            fail(field, f"must be a finite positive number, got {value!r}")
        return float(value)

    def rank_value(field, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(field, f"must be a positive integer, got {value!r}")
        return value

    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        fail("peft_type", f"{peft_type!r} is not supported (only LORA)")
    if config.get("use_dora"):
        fail("use_dora", "DoRA adapters are not supported")
    if config.get("modules_to_save"):
        fail("modules_to_save", f"{config['modules_to_save']} would replace base-model modules; not supported")
    if config.get("bias", "none") != "none":
        fail("bias", f"{config['bias']!r}: adapters that train biases are not supported (need 'none')")
    if config.get("lora_bias"):
        fail("lora_bias", "LoRA bias (a bias on lora_B) is not supported")
    if config.get("fan_in_fan_out"):
        fail("fan_in_fan_out", "true is for GPT-2 style Conv1D layers; Llama's projections are Linear")
    for field in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if config.get(field):
            fail(field, "not supported")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            fail("target_modules", f"must be a string or a list of strings, got {targets!r}")
        model_modules = sorted(HF_MODULE_NAMES.values())
        for t in targets:
            if t.split(".")[-1] not in _TARGET_OF_HF:
                fail("target_modules", f"{t!r} is not a module of this model ({cfg.name}); it has {model_modules}")

    patterns = {}
    for field, check in (("rank_pattern", rank_value), ("alpha_pattern", number)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            fail(field, f"must be an object of module name -> value, got {type(pattern).__name__}")
        for key, value in pattern.items():
            check(f"{field}[{key!r}]", value)
            try:
                re.compile(key)
            except re.error as e:
                fail(field, f"key {key!r} is not a valid module pattern ({e})")
        patterns[field] = pattern

    layers = config.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   and 0 <= i < cfg.num_layers for i in layers):
            fail("layers_to_transform", f"must be layer indices in [0, {cfg.num_layers}), got "
                                        f"{config.get('layers_to_transform')!r}")
        layers = tuple(layers)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        fail("use_rslora", f"must be true or false, got {use_rslora!r}")
    return PeftConfig(rank=rank_value("r", config.get("r", 8)), alpha=number("lora_alpha", config.get("lora_alpha", 8)),
                      use_rslora=use_rslora, rank_pattern=patterns["rank_pattern"],
                      alpha_pattern=patterns["alpha_pattern"], layers=layers)


def check_finite_weights(where: str, a: np.ndarray, b: np.ndarray) -> None:
    """Reject NaN or infinite LoRA weights (they would only poison the adapter's own requests, but a
    tenant gets a clear error at load time instead)."""
    for which, x in (("lora_A", a), ("lora_B", b)):
        if not np.isfinite(x).all():
            raise AdapterError(f"{where}: {which} holds NaN or infinite values")


@dataclasses.dataclass(frozen=True)
class _Module:
    """One projection of one layer in an adapter file, as its header describes it."""
    target: str
    layer: int
    name: str      # the HF module name, for errors
    a_key: str
    b_key: str
    rank: int


@contextlib.contextmanager
def _opened(path: Path, cfg: ModelConfig, max_rank: int):
    """A PEFT directory opened once, after every check that needs no weight data: its config, and its
    tensors' names, dtypes and shapes from the safetensors header. Yields (config, weights file, its open
    TensorReader, modules, rank per target)."""
    config_file = path / "adapter_config.json"
    weights_file = path / "adapter_model.safetensors"
    if not config_file.exists():
        raise AdapterError(f"{config_file}: not found (not a PEFT adapter directory)")
    if not weights_file.exists():
        raise AdapterError(f"{weights_file}: not found (only safetensors adapters are read)")
    for file in (config_file, weights_file):  # a FIFO or device would block the read that opens it
        if not file.is_file():
            raise AdapterError(f"{file}: not a regular file")
    config = _read_config(config_file, cfg)

    try:
        reader = TensorReader([weights_file])
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise AdapterError(f"{weights_file}: cannot be read ({e})") from None
    pieces: dict[tuple[str, int], dict[str, tuple[str, tuple[int, ...], str]]] = {}
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
            pieces.setdefault((_TARGET_OF_HF[hf_module], layer), {})[which] = (key, *reader.shape_and_dtype(key))
        if not pieces:
            raise AdapterError(f"{weights_file}: holds no LoRA weights")

        modules, ranks = [], {}
        for (target, layer), ab in sorted(pieces.items()):
            module_name = f"model.layers.{layer}.{'mlp' if target in ('gate', 'up', 'down') else 'self_attn'}." \
                          f"{HF_MODULE_NAMES[target]}"
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{weights_file}: {module_name} has lora_{'A' if 'A' in ab else 'B'} "
                                   f"but not its pair")
            fan_in, fan_out = cfg.module_shape(target)
            (a_key, a_shape, a_dtype), (b_key, b_shape, b_dtype) = ab["A"], ab["B"]
            for which, dtype in (("lora_A", a_dtype), ("lora_B", b_dtype)):
                if not dtype.startswith(("F", "BF")):  # F64 ... F8_E4M3, BF16; not I*, U*, BOOL
                    dtype = _INTEGER_DTYPES.get(dtype, dtype)
                    raise AdapterError(f"{weights_file}: {module_name}: {which} is {dtype}; LoRA weights must be "
                                       f"floating point (float32, float16 or bfloat16)")
            if config.layers is not None and layer not in config.layers:
                raise AdapterError(f"{weights_file}: {module_name}: layer {layer} is not in {config_file.name}'s "
                                   f"field 'layers_to_transform' {list(config.layers)}")
            r = a_shape[0] if len(a_shape) == 2 else -1
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != fan_in or b_shape != (fan_out, r):
                raise AdapterError(
                    f"{weights_file}: {module_name}: lora_A {a_shape} and lora_B {b_shape} do "
                    f"not match the model ({cfg.name}) which needs ({'r'}, {fan_in}) and ({fan_out}, r)")
            expected = _pattern_value(config.rank_pattern, module_name, config.rank)
            if r != expected:
                raise AdapterError(f"{config_file}: field 'r'/'rank_pattern' gives rank {expected} for "
                                   f"{module_name} but {weights_file} holds rank {r}")
            if r > max_rank:
                raise AdapterError(f"{config_file}: field 'r': rank {r} ({module_name}) is above the "
                                   f"configured maximum LoRA rank {max_rank}")
            ranks[target] = max(ranks.get(target, 0), r)
            modules.append(_Module(target, layer, module_name, a_key, b_key, r))
        yield config, weights_file, reader, modules, ranks


def peft_adapter_ranks(path: str | Path, cfg: ModelConfig, max_rank: int) -> dict[str, int]:
    """A PEFT directory's rank per target, after every check load_peft_adapter makes short of reading
    the weights (their values, NaN or infinite ones included, are checked when they are read)."""
    with _opened(Path(path), cfg, max_rank) as (*_, ranks):
        return ranks


def load_peft_adapter(path: str | Path, cfg: ModelConfig, max_rank: int, name: str | None = None,
                      dtype=np.float32) -> LoraAdapter:
    """The adapter in a PEFT directory, its weights in `dtype` (float32 by default; the host tier asks for
    the pool's dtype, so packing its pages is a plain copy). A is a transposed view of A^T [L, r, in],
    the file's own layout and the pool's (its rows are what the pages hold).

    The file is read in one call, and each target's layers are gathered, scaled and checked in a few
    NumPy operations, not a few per layer: each operation may release the GIL and must then win it back
    from the engine loop (up to sys.getswitchinterval(), 5 ms, each time), so a loader thread making
    ~1,500 of them read almost nothing while the loop was busy (benchmarks/adapter_load.py; TensorReader.stack)."""
    path = Path(path)
    with _opened(path, cfg, max_rank) as (config, weights_file, reader, modules, ranks):
        a_rows = {t: np.zeros((cfg.num_layers, r, cfg.module_shape(t)[0]), dtype) for t, r in ranks.items()}
        b_rows = {t: np.zeros((cfg.num_layers, r, cfg.module_shape(t)[1]), dtype) for t, r in ranks.items()}
        groups: dict[tuple[str, int], list[_Module]] = {}
        for m in modules:  # modules of one target and rank (all of a target's layers, but for rank_pattern)
            groups.setdefault((m.target, m.rank), []).append(m)
        for (target, rank), group in groups.items():
            layers = np.array([m.layer for m in group])
            if np.array_equal(layers, np.arange(cfg.num_layers)):
                layers = slice(None)  # a plain strided copy, not a scatter
            a_rows[target][layers, :rank] = reader.stack([m.a_key for m in group])      # [n, r, in]
            b = reader.stack([m.b_key for m in group])                                  # [n, out, r]
            with np.errstate(over="ignore"):  # an overflow (of the scale or the rows) is refused just below
                scale = np.array([float(_pattern_value(config.alpha_pattern, m.name, config.alpha))
                                  / (math.sqrt(m.rank) if config.use_rslora else m.rank) for m in group], np.float32)
                b_rows[target][layers, :rank] = np.swapaxes(b, 1, 2).astype(np.float32) * scale[:, None, None]
        if not all(_all_finite(x) for rows in (a_rows, b_rows) for x in rows.values()):
            for m in modules:  # name the first module that holds one
                check_finite_weights(f"{weights_file}: {m.name} (scaled by lora_alpha / r)",
                                     a_rows[m.target][m.layer, : m.rank], b_rows[m.target][m.layer, : m.rank])
    weights = {t: (a_rows[t].transpose(0, 2, 1), b_rows[t]) for t in ranks}
    return LoraAdapter(name=name or path.name, weights=weights, source=str(path))


def _all_finite(x: np.ndarray) -> bool:
    if x.dtype == ml_dtypes.bfloat16:  # its exponent bits, on integers: ml_dtypes' isfinite is 10x slower
        return not ((x.view(np.uint16) & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(x).all())


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
