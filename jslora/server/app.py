"""The FastAPI application: OpenAI's completions, chat completions and models endpoints, vLLM's
adapter loading endpoints, health and Prometheus metrics. Every refusal is an OpenAI-format error."""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jslora.loading.peft_adapter import AdapterError
from jslora.sampling import SamplingParams
from jslora.server.metrics import ServerMetrics
from jslora.server.protocol import ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest
from jslora.server.runner import EngineRunner, Overloaded

FALLBACK_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               500: "internal_error", 503: "server_overloaded"}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent (and an error message echoes) cannot
    be encoded as UTF-8, and must not turn a 400 into a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class BodySizeLimit:
    """ASGI middleware: a request body over max_bytes gets a 413 before any of it is parsed (the
    Content-Length is checked first; a chunked body is counted as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():  # the whole body once, then the client's own messages (its disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.max_bytes} bytes (--max-request-body-bytes)",
                                  "invalid_request_error")
        await response(scope, receive, send)


def check_text(field: str, text: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" survives JSON parsing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{field} is not valid Unicode (it holds a lone surrogate)", param=field) from None
    return text


async def wait_for_disconnect(http: Request) -> None:
    """Returns when the client closes the connection (the body is already read: the next ASGI message
    is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def error_response(status: int, message: str, type_: str, param=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return AsciiJSONResponse(body, status_code=status, headers=headers)


DEFAULT_MAX_BODY_BYTES = 8 << 20


def create_app(llm, *, model_name: str, api_key: str | None = None, lora_root: str | None = None,
               max_waiting: int = 1024, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    runner = EngineRunner(llm.engine, max_waiting=max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        runner.close()  # on shutdown: stop the engine thread

    app = FastAPI(title="jslora", version="0.1", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    # a prompt longer than this many characters has more tokens than the context holds: refused
    # before tokenizing (tokenizing megabytes takes seconds)
    max_prompt_chars = llm.max_model_len * llm.max_chars_per_token()
    metrics = ServerMetrics(llm.engine)
    app.state.runner, app.state.llm = runner, llm
    root = Path(lora_root).resolve() if lora_root else None

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        metrics.http_errors.labels(str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        metrics.http_errors.labels("400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"invalid request: {first.get('msg', exc)} ({param})", "invalid_request_error",
                              param)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.http_errors.labels("401").inc()
                return error_response(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    # -- helpers ---------------------------------------------------------------------------------
    def resolve_adapter(model: str) -> str | None:
        if model == model_name:
            return None
        if llm.has_adapter(model):
            return model
        raise ApiError(404, f"the model {model!r} does not exist; see /v1/models", "not_found_error", "model")

    def sampling_from(body) -> SamplingParams:
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=0 if body.top_k == -1 else body.top_k, seed=body.seed, stop=body.stop,
                                  ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def encode(prompt, field: str = "prompt") -> list[int]:
        """Token ids of a prompt; tokenized on a worker thread so that the event loop keeps serving."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param=field)
            prompt = prompt[0]
        if isinstance(prompt, str):
            check_text(field, prompt)
            if len(prompt) > max_prompt_chars:
                raise ApiError(400, f"this model's maximum context length is {llm.max_model_len} tokens; the "
                                    f"{field} has {len(prompt)} characters, more than that many tokens can hold",
                               param=field)
        try:
            return await asyncio.to_thread(llm.encode, prompt)
        except ValueError as e:
            raise ApiError(400, str(e), param=field) from None

    def submit(prompt_ids, sampling, adapter, user):
        if len(prompt_ids) + sampling.max_tokens > llm.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {llm.max_model_len} tokens; the request "
                                f"has {len(prompt_ids)} prompt tokens and max_tokens={sampling.max_tokens}",
                           param="max_tokens")
        try:
            return runner.submit(prompt_ids, sampling, adapter, client=user)
        except Overloaded as e:
            raise ApiError(503, f"server overloaded: {e}; retry later", "server_overloaded",
                           headers={"Retry-After": "1"}) from None
        except KeyError as e:
            raise ApiError(404, str(e), "not_found_error", "model") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def generate(http: Request, body, prompt_ids: list[int], chat: bool):
        adapter = resolve_adapter(body.model)
        sampling = sampling_from(body)
        arrival = time.monotonic()
        request_id, updates = submit(prompt_ids, sampling, adapter, body.user)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage(n_out):
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                    "total_tokens": len(prompt_ids) + n_out}

        def record(output):
            m = output.metrics
            if m.get("first_token_time"):
                metrics.first_token.observe(m["first_token_time"] - arrival)
            metrics.latency.observe(time.monotonic() - arrival)

        if body.stream:
            return StreamingResponse(stream(http, request_id, updates, sampling, rid, created, body.model, chat, usage,
                                            record), media_type="text/event-stream")
        update = await until_finished(http, request_id, updates)
        if update is None:  # the client went away: its request is aborted, nobody reads this
            return Response(status_code=499)
        out = update.output
        record(out)
        if out.error:  # dropped by the scheduling policy (503), a failed step (500), a bad adapter (400)
            status = out.error_status or 503
            return error_response(status, out.error, ERROR_TYPES.get(status, "server_error"))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                      "finish_reason": out.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                "usage": usage(len(out.token_ids))}

    async def until_finished(http: Request, request_id: str, updates: asyncio.Queue):
        """The request's final update, or None if the client disconnected first (then it is aborted at
        once: a client that times out and retries must not leave its first try running)."""
        disconnected = asyncio.ensure_future(wait_for_disconnect(http))
        try:
            while True:
                next_update = asyncio.ensure_future(updates.get())
                await asyncio.wait({next_update, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not next_update.done():
                    next_update.cancel()
                    runner.abort(request_id)
                    return None
                if next_update.result().finished:
                    return next_update.result()
        except asyncio.CancelledError:
            runner.abort(request_id)
            raise
        finally:
            disconnected.cancel()

    async def stream(http, request_id, updates, sampling, rid, created, model, chat, usage, record):
        """Server-sent events; text deltas hold back what could still turn out to be a stop string."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        holdback = max((len(s) for s in sampling.stop), default=1) - 1
        tokens, sent, done = [], "", False

        def event(text, finish=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                delta = delta if text or first else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            chunk = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
            if finish is not None:
                chunk["usage"] = usage(len(tokens))
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            yield event("", first=True)
            while not done:
                update = await updates.get()
                tokens += update.new_token_ids
                if update.finished:
                    done = True
                    text = update.output.text
                    record(update.output)
                    if update.output.error:  # the stream ends with an OpenAI-style error event
                        status = update.output.error_status or 503
                        error = {"message": update.output.error, "type": ERROR_TYPES.get(status, "server_error"),
                                 "param": None, "code": status}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    yield event(text[len(sent):], finish=update.output.finish_reason)
                else:
                    text = llm.decode(tokens)
                    safe = text[: len(text) - holdback] if holdback else text
                    safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for the rest
                    if len(safe) > len(sent) and safe.startswith(sent):
                        yield event(safe[len(sent):])
                        sent = safe
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away: free the request's pages
                runner.abort(request_id)

    # -- endpoints -------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        return await generate(http, body, await encode(body.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        if llm.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template")
        messages = [m.model_dump() for m in body.messages]
        for i, m in enumerate(messages):
            check_text(f"messages[{i}].content", m["content"])
        chars = sum(len(m["content"]) for m in messages)
        if chars > max_prompt_chars:
            raise ApiError(400, f"this model's maximum context length is {llm.max_model_len} tokens; the "
                                f"messages have {chars} characters, more than that many tokens can hold",
                           param="messages")
        template = None if getattr(llm.tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE

        def apply_template():
            ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    chat_template=template)
            return ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids

        try:
            ids = await asyncio.to_thread(apply_template)
        except Exception as e:  # noqa: BLE001 - a template error is the request's problem
            raise ApiError(400, f"chat template failed: {e}") from None
        return await generate(http, body, await encode(list(ids), "messages"), chat=True)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "jslora", "root": model_name,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "jslora", "root": name,
                  "parent": model_name} for name in llm.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        if body.lora_name == model_name:
            raise ApiError(400, f"{model_name!r} is the base model's name", param="lora_name")
        if llm.has_adapter(body.lora_name):  # as vLLM: replacing needs an unload first
            raise ApiError(400, f"an adapter named {body.lora_name!r} is already loaded; unload it first",
                           param="lora_name")
        source = check_text("lora_path", body.lora_path)
        if "\x00" in source:
            raise ApiError(400, "lora_path must not contain NUL characters", param="lora_path")
        if not source.startswith("dummy:"):
            path = Path(source).resolve()
            if root is None or not path.is_relative_to(root):
                raise ApiError(400, f"lora_path {source!r} is outside the allowed --lora-root "
                                    f"({root or 'none set: only dummy: adapters can be loaded'})", param="lora_path")
            source = str(path)
        try:
            await asyncio.to_thread(llm.add_adapter, body.lora_name, source)
        except (AdapterError, OSError, ValueError) as e:
            raise ApiError(400, f"cannot load adapter {body.lora_name!r}: {e}", param="lora_path") from None
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        try:
            llm.remove_adapter(body.lora_name)
        except KeyError:
            raise ApiError(404, f"no adapter named {body.lora_name!r}", "not_found_error", "lora_name") from None
        return {"status": "ok", "lora_name": body.lora_name}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
