"""Model configuration: a frozen dataclass read from a HF config.json or from configs/models/."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Projections a LoRA adapter may target, by our short name and HF's module name.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULE_NAMES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position) or
    # ("linear", factor) or None; a tuple so the config stays hashable (a static jit argument).
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, target: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q": (h, self.q_width), "k": (h, self.kv_width), "v": (h, self.kv_width),
            "o": (self.q_width, h), "gate": (h, i), "up": (h, i), "down": (i, h),
        }[target]

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "model") -> ModelConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        # transformers >= 5 nests rope settings under rope_parameters; older files have rope_theta/rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        elif rope_type == "linear":
            scaling = ("linear", float(rope["factor"]))
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")
        heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
            name=name,
        )

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        path = Path(path)
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), name=name or path.parent.name)

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A config shipped in configs/models/ (llama-7b, llama-13b, ..., tiny)."""
        path = CONFIG_DIR / "models" / f"{name}.json"
        if not path.exists():
            known = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.json"))
            raise ValueError(f"unknown model config {name!r}; known: {known}")
        return cls.from_file(path, name=name)


def slora_setting(name: str) -> dict:
    """S-LoRA's settings S1..S6: {'model': config name, 'ranks': [...]}."""
    with open(CONFIG_DIR / "slora_settings.json") as f:
        settings = json.load(f)
    if name not in settings or name.startswith("_"):
        raise ValueError(f"unknown S-LoRA setting {name!r}")
    return settings[name]
