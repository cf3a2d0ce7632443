"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extensions top_k and ignore_eos.

Strict: a field of the wrong JSON type is refused, never coerced (`max_tokens: true` is not 1, `stream:
"yes"` is not true), NaN and Infinity are refused, and every number has its real range, so what reaches
the engine is always something a step can run.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2**31 - 1
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:@+=-]*(/[A-Za-z0-9_][A-Za-z0-9_.:@+=-]*)*$"  # no blanks, no '..' parts


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(StrictBody):
    include_usage: bool = False


# Fields of OpenAI's or vLLM's API this server does not implement: accepted at their neutral value (what a
# client sends when it means "off"), refused with a 400 naming the field otherwise, never silently ignored.
UNSUPPORTED_FIELDS = {
    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "suffix": (None, ""),
}
MAX_N = 16  # choices per request (n x prompts)


class SamplingFields(StrictBody):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=INT32_MAX)     # vLLM's extension; -1 and 0 mean off
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # any 64-bit seed; drawn mod 2^31
    stop: str | list[str] | None = Field(default=None, max_length=16)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)   # only best_of == n (no ranking)
    user: str | None = Field(default=None, max_length=256)
    # vLLM's: requests share cached prompt blocks only with requests of the same salt (a tenant's own)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    include_stop_str_in_output: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)   # vLLM's extension
    logit_bias: dict[str, float] | None = Field(default=None, max_length=64)
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)                      # vLLM's extension
    # declared only so that a request using them is refused by name (UNSUPPORTED_FIELDS)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    suffix: Any = None

    def unsupported_field(self) -> str | None:
        """The first field set to something this server cannot do, if any."""
        for name, neutral in UNSUPPORTED_FIELDS.items():
            value = getattr(self, name)
            if not any(value == ok and type(value) is type(ok) or value is ok for ok in neutral):
                return name
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)   # the sampled token's and this many top ones
    echo: bool = False                                         # the prompt's text before the completion


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # a string, OpenAI's list of text parts (joined with newlines, as vLLM does), or null (an assistant
    # turn that only called tools); parts of other types (images, audio) are refused: text-only model
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)  # OpenAI's newer max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class LoadLoraRequest(StrictBody):
    lora_name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(StrictBody):
    lora_name: str = Field(max_length=200)


class TokenizeRequest(StrictBody):
    """vLLM's /tokenize: a prompt, or chat messages (then the chat template is applied)."""
    model: str | None = Field(default=None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)


class DetokenizeRequest(StrictBody):
    model: str | None = Field(default=None, max_length=256)
    tokens: list[int] = Field(max_length=1 << 20)


# -- responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: dict | None = None  # tokens, token_logprobs, top_logprobs, text_offset (OpenAI's legacy form)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict | None = None  # {"content": [{token, logprob, bytes, top_logprobs}]}


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jslora"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterStatus(BaseModel):
    status: Literal["ok"] = "ok"
    lora_name: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
