"""jslora: serving thousands of LoRA adapters of one base model, in JAX and Pallas."""
from jslora.config import ModelConfig
from jslora.llm import LLM, RequestOutput
from jslora.loading.peft_adapter import AdapterError, LoraAdapter
from jslora.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "ModelConfig", "AdapterError", "LoraAdapter"]
