"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extensions top_k and ignore_eos."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0           # vLLM's extension; -1 also means off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str
