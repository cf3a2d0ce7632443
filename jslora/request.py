"""A request's host-side state, from submission to finish, and the updates the engine reports."""
from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from jslora.sampling import SamplingParams

if TYPE_CHECKING:  # the engine's registry imports this module; only the type is needed here
    from jslora.engine.adapter_store import AdapterEntry


class RequestError(ValueError):
    """A request the engine cannot take; `param` names the field to blame (the API's 400 names it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_prompt_ids(prompt_ids, vocab_size: int) -> list[int]:
    """The prompt as a list of ints; RequestError if it is empty or has ids outside the vocabulary."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise RequestError("empty prompt", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
    return ids


def check_request(prompt_ids, sampling: SamplingParams, vocab_size: int, max_model_len: int) -> list[int]:
    """Every check of a request's prompt and length, in one place (the engine, LLM and the server all
    rely on it). Returns the prompt as a list of ints."""
    ids = check_prompt_ids(prompt_ids, vocab_size)
    if len(ids) + sampling.max_tokens > max_model_len:
        raise RequestError(f"this model's maximum context length is {max_model_len} tokens: the prompt "
                           f"({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the model's context "
                           f"length", "max_tokens")
    bad = [t for t in (sampling.logit_bias or {}) if t >= vocab_size]
    if bad:
        raise RequestError(f"logit_bias names token ids outside the vocabulary (size {vocab_size}): {bad[:5]}",
                           "logit_bias")
    return ids


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestUpdate:
    """What one engine step did to one request: new tokens and, at the end, why it finished."""
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None   # "length", "stop", "abort"
    output: RequestOutput | None = None
    new_logprobs: list | None = None   # with SamplingParams.logprobs: the new tokens' (RequestOutput.logprobs)
    prompt_logprobs: list | None = None  # with SamplingParams.prompt_logprobs, on the first token's update


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "length", "stop" or "abort"
    adapter: str | None = None
    request_id: str | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    error: str | None = None  # with finish_reason "abort": why the engine dropped it (a policy, a failure)
    error_status: int | None = None  # and the HTTP status that error maps to (503 policy, 500 failure, 400)
    # with SamplingParams.logprobs: per generated token (its logprob, top ids, their logprobs)
    logprobs: list[tuple[float, list[int], list[float]]] | None = None
    # with SamplingParams.prompt_logprobs: per prompt token, the same (None for the first: nothing before it)
    prompt_logprobs: list | None = None


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterEntry | None      # the registered adapter version, or None for the base model
    seed: int
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    client: str | None = None         # who is served fairly (scheduling policies): adapter or user
    on_update: Callable[[RequestUpdate], None] | None = None
    cache_salt: str | None = None     # shares cached prompt blocks only with requests of the same salt

    generated: list[int] = dataclasses.field(default_factory=list)
    pending: int = 0            # tokens sampled on the device whose ids the host has not read yet
    logprobs: list = dataclasses.field(default_factory=list)  # per generated token, if asked (RequestOutput)
    prompt_logprobs: dict = dataclasses.field(default_factory=dict)  # prompt position -> entry, if asked
    num_computed: int = 0       # tokens whose KV is in the pool (or written by a step in flight)
    prefill_target: int = 0     # tokens to prefill since its admission (its all_ids then), in chunks
    cached_tokens: int = 0      # of those, found in the prefix cache at its last admission
    cache_chain: tuple[int, int] = (0, 0)  # prefix cache: (its blocks registered, the last one's entry id)
    k_blocks: list[int] = dataclasses.field(default_factory=list)
    v_blocks: list[int] = dataclasses.field(default_factory=list)
    batch_slot: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_text: str | None = None  # the text cut at a stop string, when one matched
    admit_time: float | None = None   # when the scheduler last admitted it
    first_token_time: float | None = None
    error: str | None = None          # why it was aborted, when the server or a policy did it
    error_status: int | None = None   # the HTTP status of that error
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def adapter_name(self) -> str | None:
        return None if self.adapter is None else self.adapter.name

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building the list (the scheduler asks for it every step, per row)."""
        return len(self.prompt_ids) + len(self.generated)

    def is_prefilling(self) -> bool:
        """Running, and some of its prompt (or, after a preemption, its tokens) is not in the pool yet."""
        return self.status is Status.RUNNING and self.num_computed < self.prefill_target

    def wants_decode_row(self) -> bool:
        """Running with its prompt in the pool, and more tokens are due than are already sampled or in flight."""
        return (self.status is Status.RUNNING and self.finish_reason is None and not self.is_prefilling()
                and len(self.generated) + self.pending < self.sampling.max_tokens)

    def prompt_logprob_list(self) -> list | None:
        """RequestOutput.prompt_logprobs: None for the first prompt token, then each one's entry."""
        if self.sampling.prompt_logprobs is None:
            return None
        return [None] + [self.prompt_logprobs.get(p) for p in range(1, len(self.prompt_ids))]

    def ends_with_stop_token(self, eos_ids) -> bool:
        """Whether the last generated token ended the request as a stop token (EOS unless ignore_eos, or one
        of stop_token_ids): it is in token_ids but not in the text."""
        sp = self.sampling
        last = self.generated[-1] if self.generated else None
        return last is not None and ((last in eos_ids and not sp.ignore_eos) or last in sp.stop_token_ids)

    def append_token(self, token: int, eos_ids, detokenize) -> str | None:
        """Record a sampled token; return the finish reason if it ends the request (max_tokens, EOS, a stop
        token id or a stop string; the stop string and what follows it are not part of the text, unless
        include_stop_str_in_output keeps the stop string)."""
        self.generated.append(token)
        sp = self.sampling
        is_stop_token = self.ends_with_stop_token(eos_ids)
        if sp.stop and detokenize is not None:
            text = detokenize(self.generated[:-1] if is_stop_token else self.generated)
            found = [(i, s) for s in sp.stop for i in (text.find(s),) if i >= 0]
            if found:
                cut, matched = min(found)
                self.stop_text = text[: cut + len(matched)] if sp.include_stop_str_in_output else text[:cut]
                return "stop"
        if is_stop_token:
            return "stop"
        if len(self.generated) >= sp.max_tokens:
            return "length"
        return None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Tokens start .. start + length - 1 of a request's all_ids, prefilled in one step (chunked
    prefill); the chunk that ends the prompt samples the request's next token."""
    request: Request
    start: int
    length: int

    @property
    def is_last(self) -> bool:
        return self.start + self.length == self.request.prefill_target

    def prompt_logprob_positions(self) -> range:
        """Positions of this chunk whose logits give a prompt token's logprob (the next one's), if the
        request asks for them: every prompt position but the last (that one samples the first token)."""
        if self.request.sampling.prompt_logprobs is None:
            return range(0)
        return range(self.start, min(self.start + self.length, len(self.request.prompt_ids) - 1))
