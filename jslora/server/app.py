"""The FastAPI application: OpenAI's completions, chat completions and models endpoints, vLLM's
adapter loading endpoints, health and Prometheus metrics (handlers in jslora/server/handlers.py).
Every refusal is an OpenAI-format error."""
from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jslora import __version__
from jslora.server.errors import ApiError, AsciiJSONResponse, error_response
from jslora.server.handlers import OpenAIServing
from jslora.server.metrics import ServerMetrics
from jslora.server.middleware import ApiKeyAuth, BodySizeLimit
from jslora.server.protocol import (
    AdapterStatus,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraRequest,
    VersionResponse,
)
from jslora.server.runner import EngineRunner

DEFAULT_MAX_BODY_BYTES = 8 << 20


def create_app(llm, *, model_name: str, api_key: str | None = None, lora_root: str | None = None,
               lora_resolver: bool = False, max_waiting: int = 1024,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    runner = EngineRunner(llm.engine, max_waiting=max_waiting)
    metrics = ServerMetrics(llm.engine, model_name)
    serving = OpenAIServing(llm, runner, metrics, model_name=model_name, lora_root=lora_root,
                            lora_resolver=lora_resolver)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        runner.close()  # on shutdown: stop the engine thread

    app = FastAPI(title="jslora", version="0.1", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.runner, app.state.llm = runner, llm
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key, on_refused=lambda: metrics.http_errors.labels("401").inc())
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)  # outermost: before anything reads the body

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        metrics.http_errors.labels(str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        metrics.http_errors.labels("400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"invalid request: {first.get('msg', exc)} ({param})", param=param)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        return await serving.completions(body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        return await serving.chat_completions(body, http)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return serving.models()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> AdapterStatus:
        return await serving.load_lora_adapter(body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> AdapterStatus:
        return serving.unload_lora_adapter(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving.detokenize(body)

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
