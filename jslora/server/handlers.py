"""The OpenAI-compatible endpoints' logic (completions, chat, models, vLLM's adapter loading), over an
LLM and the EngineRunner that drives its engine. jslora/server/app.py only wires routes to these."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from jslora.loading.peft_adapter import AdapterError
from jslora.request import RequestError, RequestOutput, check_prompt_ids
from jslora.sampling import SamplingParams
from jslora.server.errors import ApiError, check_text, error_body, error_response
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


async def wait_for_disconnect(http: Request) -> None:
    """Returns when the client closes the connection (the body is already read: the next ASGI message
    is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


@dataclasses.dataclass
class Generation:
    """One submitted request as the handlers see it: what its response needs."""
    request_id: str
    updates: asyncio.Queue
    sampling: SamplingParams
    model: str
    chat: bool
    prompt_tokens: int
    arrival: float
    index: int = 0                # the choice it fills (prompt i, sample j: i * n + j)
    echo: str = ""                # completions with echo: the prompt's text, before the completion
    response_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.response_id}"

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)


class OpenAIServing:
    def __init__(self, llm, runner: EngineRunner, metrics: ServerMetrics, *, model_name: str,
                 lora_root: str | None = None, lora_resolver: bool = False):
        """lora_resolver: a request naming an unknown model that is an adapter directory right under
        lora_root registers it first (as vLLM's filesystem LoRA resolver)."""
        self.llm, self.runner, self.metrics, self.model_name = llm, runner, metrics, model_name
        self.lora_root = Path(lora_root).resolve() if lora_root else None
        self.lora_resolver = lora_resolver and self.lora_root is not None
        self._resolving: dict[str, asyncio.Future] = {}  # adapter name -> its registration in progress
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
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs needs the prompt's logprobs, which this server does not "
                                "compute", param="echo")
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
                                  min_tokens=body.min_tokens, logprobs=logprobs)
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
            request_id, updates = self.runner.submit(prompt_ids, sampling, adapter, client=body.user)
        except Overloaded as e:
            raise ApiError(503, f"server overloaded: {e}; retry later", headers={"Retry-After": "1"}) from None
        except KeyError as e:
            raise ApiError(404, str(e), param="model") from None
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return Generation(request_id, updates, sampling, body.model, chat, len(prompt_ids), arrival, index=index,
                          echo=echo)

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
            return StreamingResponse(self._stream(gens, usage, usage_chunk), media_type="text/event-stream")
        updates = await asyncio.gather(*(self._until_finished(http, gen) for gen in gens))
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
            if chat:
                choices.append(ChatChoice(index=gen.index, message=AssistantMessage(content=out.text),
                                          finish_reason=out.finish_reason,
                                          logprobs=self._logprobs(gen, out.token_ids, out.logprobs)))
            else:
                choices.append(CompletionChoice(index=gen.index, text=gen.echo + out.text,
                                                finish_reason=out.finish_reason,
                                                logprobs=self._logprobs(gen, out.token_ids, out.logprobs)))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        response = ChatCompletionResponse if chat else CompletionResponse
        return response(id=gens[0].id, created=gens[0].created, model=gens[0].model, choices=choices, usage=usage)

    def _logprobs(self, gen: Generation, token_ids: list[int], logprobs: list | None, offset: int = 0) -> dict | None:
        """The tokens' logprobs in OpenAI's form: chat {"content": [{token, logprob, bytes, top_logprobs}]},
        completions the legacy tokens, token_logprobs, top_logprobs, text_offset (from offset)."""
        if logprobs is None:
            return None
        if gen.chat:
            def entry(token_id: int, logprob: float) -> dict:
                text = self.llm.decode([token_id])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in zip(ids, values)]}
                                for t, (lp, ids, values) in zip(token_ids, logprobs)]}
        tokens = [self.llm.decode([t]) for t in token_ids]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in logprobs],
                "top_logprobs": [{self.llm.decode([t]): v for t, v in zip(ids, values)} for _, ids, values in
                                 logprobs], "text_offset": offsets}

    async def _until_finished(self, http: Request, gen: Generation):
        """The request's final update, or None if the client disconnected first (then it is aborted at
        once: a client that times out and retries must not leave its first try running)."""
        disconnected = asyncio.ensure_future(wait_for_disconnect(http))
        try:
            while True:
                next_update = asyncio.ensure_future(gen.updates.get())
                await asyncio.wait({next_update, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not next_update.done():
                    next_update.cancel()
                    self.runner.abort(gen.request_id)
                    return None
                if next_update.result().finished:
                    return next_update.result()
        except asyncio.CancelledError:
            self.runner.abort(gen.request_id)
            raise
        finally:
            disconnected.cancel()

    def _chunk(self, gen: Generation, text: str, finish: str | None = None, first: bool = False,
               completion_tokens: int = 0, logprobs: dict | None = None) -> str:
        if gen.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": gen.index, "delta": delta if text or first else {}, "finish_reason": finish,
                      "logprobs": logprobs}
        else:
            choice = {"index": gen.index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        chunk = {"id": gen.id, "object": "chat.completion.chunk" if gen.chat else "text_completion",
                 "created": gen.created, "model": gen.model, "choices": [choice]}
        if finish is not None:
            chunk["usage"] = gen.usage(completion_tokens).model_dump()
        return f"data: {json.dumps(chunk)}\n\n"

    async def _stream(self, gens: list[Generation], usage: Usage, usage_chunk: bool = False):
        """Server-sent events of every choice, as their tokens come; then, with usage_chunk
        (stream_options.include_usage), a last chunk with no choices and the usage, as OpenAI's."""
        events: asyncio.Queue = asyncio.Queue()
        done: set[str] = set()

        async def pump(gen: Generation) -> None:
            try:
                async for event in self._choice_events(gen):
                    await events.put(event)
            finally:
                await events.put(gen)  # this choice is over

        tasks = [asyncio.ensure_future(pump(gen)) for gen in gens]
        try:
            while len(done) < len(gens):
                event = await events.get()
                if isinstance(event, Generation):
                    done.add(event.request_id)
                elif isinstance(event, int):
                    usage.completion_tokens += event
                else:
                    yield event
            if usage_chunk:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                first = gens[0]
                yield "data: " + json.dumps({"id": first.id, "object": "chat.completion.chunk" if first.chat else
                                             "text_completion", "created": first.created, "model": first.model,
                                             "choices": [], "usage": usage.model_dump()}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            for gen in gens:
                if gen.request_id not in done:  # the client went away: free the request's pages
                    self.runner.abort(gen.request_id)

    async def _choice_events(self, gen: Generation):
        """One choice's events; text deltas hold back what could still turn out to be a stop string.
        Yields its completion token count (an int) last."""
        holdback = max((len(s) for s in gen.sampling.stop), default=1) - 1
        tokens, sent = [], ""
        wants_logprobs = gen.sampling.logprobs is not None
        reported = 0  # tokens whose logprobs went out: a chunk carries those of the tokens since the last
        logprobs: list = []

        def pending_logprobs(until: int) -> dict | None:
            nonlocal reported
            if not wants_logprobs:
                return None
            out = self._logprobs(gen, tokens[reported:until], logprobs[reported:until], offset=len(sent))
            reported = until
            return out

        yield self._chunk(gen, gen.echo, first=True)
        while True:
            update = await gen.updates.get()
            tokens += update.new_token_ids
            logprobs += update.new_logprobs or []
            if update.finished:
                out = update.output
                self._record(gen, out)
                if out.error:  # the stream ends with an OpenAI-style error event
                    yield f"data: {json.dumps(error_body(out.error_status or 503, out.error))}\n\n"
                else:
                    logprobs = out.logprobs or []
                    yield self._chunk(gen, out.text[len(sent):], finish=out.finish_reason,
                                      completion_tokens=len(tokens), logprobs=pending_logprobs(len(logprobs)))
                yield len(tokens)
                return
            text = self.llm.decode(tokens)
            safe = text[: len(text) - holdback] if holdback else text
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for the rest
            if len(safe) > len(sent) and safe.startswith(sent):
                yield self._chunk(gen, safe[len(sent):], logprobs=pending_logprobs(len(logprobs)))
                sent = safe
