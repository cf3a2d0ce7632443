"""jslora: serving thousands of LoRA adapters of one base model, in JAX and Pallas."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jslora")
except PackageNotFoundError:  # run from a source tree (PYTHONPATH=.) without installing
    __version__ = "0.1.0+source"

from jslora.config import ModelConfig
from jslora.llm import LLM, RequestOutput
from jslora.loading.peft_adapter import AdapterError, LoraAdapter
from jslora.sampling import SamplingParams

__all__ = ["__version__", "LLM", "SamplingParams", "RequestOutput", "ModelConfig", "AdapterError", "LoraAdapter"]
