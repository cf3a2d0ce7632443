"""The OpenAI-compatible endpoints' logic (completions, chat, models, vLLM's adapter loading), over an
LLM and the EngineRunner that drives its engine: requests in (fields, adapters, prompts), choices submitted;
how they go out (streams, logprobs) is jslora/server/generation.py. jslora/server/app.py only wires
routes to these."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from jslora.loading.peft_adapter import AdapterError
from jslora.request import RequestError, RequestOutput, check_prompt_ids
from jslora.sampling import SamplingParams
from jslora.server.errors import ApiError, check_text, error_response
from jslora.server.generation import (
    ChoiceStreamer,
    Generation,
    join_logprobs,
    logprobs_json,
    prompt_logprobs_json,
    until_finished,
)
from jslora.server.metrics import ServerMetrics
from jslora.server.protocol import (
    INT32_MAX,
    MAX_N,
    AdapterStatus,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraRequest,
    Usage,
)
from jslora.server.runner import EngineRunner, Overloaded


class OpenAIServing:
    def __init__(self, llm, runner: EngineRunner, metrics: ServerMetrics, *, model_name: str,
                 lora_root: str | None = None, lora_resolver: bool = False):
        """lora_resolver: a request naming an unknown model that is an adapter directory right under
        lora_root registers it first (as vLLM's filesystem LoRA resolver)."""
        self.llm, self.runner, self.metrics, self.model_name = llm, runner, metrics, model_name
        self.lora_root = Path(lora_root).resolve() if lora_root else None
        self.lora_resolver = lora_resolver and self.lora_root is not None
        self._resolving: dict[str, asyncio.Future] = {}  # adapter name -> its registration in progress
        self.streamer = ChoiceStreamer(llm.decode, self._record, runner.abort)
        # a prompt longer than this many characters has more tokens than the context holds: refused
        # before tokenizing (tokenizing megabytes takes seconds)
        self.max_prompt_chars = llm.max_model_len * llm.max_chars_per_token()

    # -- endpoints -------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, http: Request):
        prompt = body.prompt
        several = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = prompt if several else [prompt]
        if len(prompts) * body.n > MAX_N:
            raise ApiError(400, f"at most {MAX_N} choices per request (prompts x n), got {len(prompts) * body.n}",
                           param="prompt")
        ids = [await self._encode(p) for p in prompts]
        echo = [(p if isinstance(p, str) else self.llm.decode(i)) if body.echo else "" for p, i in zip(prompts, ids)]
        return await self._generate(http, body, ids, chat=False, echo=echo)

    async def chat_completions(self, body: ChatCompletionRequest, http: Request):
        if self.llm.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for i, m in enumerate(messages):
            check_text(f"messages[{i}].content", m["content"])
        chars = sum(len(m["content"]) for m in messages)
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"this model's maximum context length is {self.llm.max_model_len} tokens; the "
                                f"messages have {chars} characters, more than that many tokens can hold",
                           param="messages")
        try:
            ids = await asyncio.to_thread(self.llm.chat_prompt_ids, messages)
        except Exception as e:  # noqa: BLE001 - a template error is the request's problem
            raise ApiError(400, f"chat template failed: {e}") from None
        return await self._generate(http, body, [await self._encode(ids, "messages")], chat=True)

    def models(self) -> ModelList:
        created = int(time.time())
        cards = [ModelCard(id=self.model_name, created=created, root=self.model_name)]
        cards += [ModelCard(id=name, created=created, root=name, parent=self.model_name) for name in self.llm.adapters]
        return ModelList(data=cards)

    async def load_lora_adapter(self, body: LoadLoraRequest) -> AdapterStatus:
        if body.lora_name == self.model_name:
            raise ApiError(400, f"{self.model_name!r} is the base model's name", param="lora_name")
        if self.llm.has_adapter(body.lora_name):  # as vLLM: replacing needs an unload first
            raise ApiError(400, f"an adapter named {body.lora_name!r} is already loaded; unload it first",
                           param="lora_name")
        source = check_text("lora_path", body.lora_path)
        if "\x00" in source:
            raise ApiError(400, "lora_path must not contain NUL characters", param="lora_path")
        if not source.startswith("dummy:"):
            path = Path(source).resolve()
            if self.lora_root is None or not path.is_relative_to(self.lora_root):
                raise ApiError(400, f"lora_path {source!r} is outside the allowed --lora-root "
                                    f"({self.lora_root or 'none set: only dummy: adapters can be loaded'})",
                               param="lora_path")
            source = str(path)
        try:
            await asyncio.to_thread(self.llm.add_adapter, body.lora_name, source)
        except (AdapterError, OSError, ValueError) as e:
            raise ApiError(400, f"cannot load adapter {body.lora_name!r}: {e}", param="lora_path") from None
        return AdapterStatus(lora_name=body.lora_name)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            for i, m in enumerate(messages):
                check_text(f"messages[{i}].content", m["content"])
            try:
                ids = await asyncio.to_thread(self.llm.chat_prompt_ids, messages)
            except Exception as e:  # noqa: BLE001 - a template error is the request's problem
                raise ApiError(400, f"chat template failed: {e}") from None
        else:
            ids = await self._encode(body.prompt)
        return TokenizeResponse(count=len(ids), max_model_len=self.llm.max_model_len, tokens=ids)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        try:
            ids = check_prompt_ids(body.tokens, self.llm.config.vocab_size) if body.tokens else []
        except ValueError as e:
            raise ApiError(400, str(e), param="tokens") from None
        return DetokenizeResponse(prompt=self.llm.decode(ids))

    def unload_lora_adapter(self, body: UnloadLoraRequest) -> AdapterStatus:
        try:
            self.llm.remove_adapter(body.lora_name)
        except KeyError:
            raise ApiError(404, f"no adapter named {body.lora_name!r}", param="lora_name") from None
        return AdapterStatus(lora_name=body.lora_name)

    # -- request handling ------------------------------------------------------------------------
    async def _adapter(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        if self.llm.has_adapter(model):
            return model
        path = self._resolvable(model)
        if path is None:
            raise ApiError(404, f"the model {model!r} does not exist; see /v1/models", param="model")
        await self._resolve(model, path)
        return model

    def _resolvable(self, name: str) -> Path | None:
        """The adapter directory the resolver may load for this model name: one path component under
        the root, holding adapter_config.json, not leading outside the root through a link."""
        if not self.lora_resolver or not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
            return None
        path = (self.lora_root / name).resolve()
        if not path.is_relative_to(self.lora_root) or not (path / "adapter_config.json").is_file():
            return None
        return path

    async def _resolve(self, name: str, path: Path) -> None:
        """Register the adapter at path under name, on a worker thread (the engine and the event loop go
        on); concurrent requests for it wait for the one registration."""
        task = self._resolving.get(name)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self.llm.add_adapter, name, str(path)))
            self._resolving[name] = task
            task.add_done_callback(lambda _: self._resolving.pop(name, None))
        try:
            await asyncio.shield(task)
        except (AdapterError, OSError, ValueError) as e:
            raise ApiError(400, f"cannot load adapter {name!r} from the LoRA root: {e}", param="model") from None

    def _sampling(self, body: SamplingFields, prompt_len: int, chat: bool, choice: int = 0) -> SamplingParams:
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of must equal n: candidates are not ranked", param="best_of")
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        # completions' echo with logprobs: the prompt's tokens get theirs too (computed in its prefill)
        prompt_logprobs = logprobs if not chat and getattr(body, "echo", False) else None
        unsupported = body.unsupported_field()
        if unsupported is not None:
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
        max_tokens = body.max_tokens
        if chat and body.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != body.max_completion_tokens:
                raise ApiError(400, "max_tokens and max_completion_tokens differ", param="max_completion_tokens")
            max_tokens = body.max_completion_tokens
        if max_tokens is None:  # as vLLM: chat runs to the end of the context, completions 16 tokens
            max_tokens = max(1, self.llm.max_model_len - prompt_len) if chat else 16
        try:
            # n > 1: sample j draws from seed + j, so the choices differ and a seeded request is reproducible
            seed = None if body.seed is None else (body.seed + choice) % (INT32_MAX + 1)
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=0 if body.top_k == -1 else body.top_k, seed=seed, stop=body.stop,
                                  ignore_eos=body.ignore_eos, stop_token_ids=body.stop_token_ids or (),
                                  include_stop_str_in_output=body.include_stop_str_in_output,
                                  presence_penalty=body.presence_penalty or 0.0,
                                  frequency_penalty=body.frequency_penalty or 0.0,
                                  repetition_penalty=body.repetition_penalty or 1.0, logit_bias=body.logit_bias,
                                  min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def _encode(self, prompt, field: str = "prompt") -> list[int]:
        """Token ids of a prompt; tokenized on a worker thread so that the event loop keeps serving."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param=field)
            prompt = prompt[0]
        if isinstance(prompt, str):
            check_text(field, prompt)
            if len(prompt) > self.max_prompt_chars:
                raise ApiError(400, f"this model's maximum context length is {self.llm.max_model_len} tokens; "
                                    f"the {field} has {len(prompt)} characters, more than that many tokens can "
                                    f"hold", param=field)
        try:
            return await asyncio.to_thread(self.llm.encode, prompt)
        except ValueError as e:
            raise ApiError(400, str(e), param=field) from None

    def _submit(self, prompt_ids: list[int], body: SamplingFields, chat: bool, adapter: str | None,
                index: int = 0, echo: str = "") -> Generation:
        sampling = self._sampling(body, len(prompt_ids), chat, choice=index % body.n)
        arrival = time.monotonic()
        try:
            request_id, updates = self.runner.submit(prompt_ids, sampling, adapter, client=body.user,
                                                     cache_salt=body.cache_salt)
        except Overloaded as e:
            raise ApiError(503, f"server overloaded: {e}; retry later", headers={"Retry-After": "1"}) from None
        except KeyError as e:
            raise ApiError(404, str(e), param="model") from None
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return Generation(request_id, updates, sampling, body.model, chat, len(prompt_ids), arrival, index=index,
                          echo=echo, prompt_ids=prompt_ids)

    def _record(self, gen: Generation, output: RequestOutput) -> None:
        first = output.metrics.get("first_token_time")
        if first:
            self.metrics.first_token.observe(first - gen.arrival)
        self.metrics.latency.observe(time.monotonic() - gen.arrival)

    async def _generate(self, http: Request, body: SamplingFields, prompts: list[list[int]], chat: bool,
                        echo: list[str] | None = None):
        """Submit n samples of each prompt (choice i * n + j), then answer with all of them."""
        adapter = await self._adapter(body.model)
        gens: list[Generation] = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(body.n):
                    gens.append(self._submit(ids, body, chat, adapter, i * body.n + j, echo[i] if echo else ""))
        except ApiError:
            for gen in gens:  # a later choice was refused: the request fails whole
                self.runner.abort(gen.request_id)
            raise
        for gen in gens[1:]:  # one response: one id
            gen.response_id, gen.created = gens[0].response_id, gens[0].created
        usage = Usage(prompt_tokens=sum(map(len, prompts)), completion_tokens=0, total_tokens=0)
        if body.stream:
            usage_chunk = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.streamer.stream(gens, usage, usage_chunk), media_type="text/event-stream")
        updates = await asyncio.gather(*(until_finished(http, gen, self.runner.abort) for gen in gens))
        if any(update is None for update in updates):  # the client went away: every choice is aborted
            for gen in gens:
                self.runner.abort(gen.request_id)
            return Response(status_code=499)
        choices = []
        for gen, update in zip(gens, updates):
            out = update.output
            self._record(gen, out)
            if out.error:  # dropped by the scheduling policy (503), a failed step (500), a bad adapter (400)
                for other in gens:
                    self.runner.abort(other.request_id)
                return error_response(out.error_status or 503, out.error)
            usage.completion_tokens += len(out.token_ids)
            logprobs = logprobs_json(self.llm.decode, chat, out.token_ids, out.logprobs, offset=len(gen.echo))
            if out.prompt_logprobs is not None:  # echo: the prompt's tokens first
                logprobs = join_logprobs(prompt_logprobs_json(self.llm.decode, gen.prompt_ids, out.prompt_logprobs),
                                         logprobs)
            if chat:
                choices.append(ChatChoice(index=gen.index, message=AssistantMessage(content=out.text),
                                          finish_reason=out.finish_reason, logprobs=logprobs))
            else:
                choices.append(CompletionChoice(index=gen.index, text=gen.echo + out.text,
                                                finish_reason=out.finish_reason, logprobs=logprobs))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        response = ChatCompletionResponse if chat else CompletionResponse
        return response(id=gens[0].id, created=gens[0].created, model=gens[0].model, choices=choices, usage=usage)
