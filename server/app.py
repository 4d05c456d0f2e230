"""FastAPI app factory: routes, lifespan (starts/stops the engine), auth + body-size guard, errors.

    app = create_app(settings)                 # builds the real EngineSupervisor in the lifespan
    app = create_app(settings, supervisor)     # any object with EngineSupervisor's interface
    app = create_app(settings, replica={"id": "a1b2", "pid": 123})   # /health names its replica

Every error is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}. Validation errors
are 400 (not FastAPI's 422); an unknown request field is a 400 naming it. 429 and 503 carry a
Retry-After header estimated from the queue. A client disconnect (ASGI `http.disconnect`) cancels
the request. Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize,
/version, /health, /metrics.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from server import protocol as P
from server.engine_client import EngineClient, EngineClientError, make_supervisor
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.request_params import load_sampling_defaults
from server.serving import OpenAIError, OpenAIServing, error_body, server_version
from server.settings import Settings

logger = logging.getLogger("amusd.server")
_ERROR_TYPES = {500: "internal_server_error", 503: "service_unavailable"}   # 4xx: invalid_request_error
_TOKENIZER_PATHS = ("/tokenize", "/detokenize")   # behind the API key like /v1/*


def load_tokenizer(path: str) -> Any:
    """A fast tokenizer from a local dir (PreTrainedTokenizerFast: does not import torch)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(path)


def _error(status: int, message: str, type: str | None = None, param: str | None = None,
           code: Any = None) -> JSONResponse:
    return JSONResponse(error_body(message, type or _ERROR_TYPES.get(status, "invalid_request_error"),
                                   param, code), status_code=status)


class GuardMiddleware:
    """Pure ASGI: API-key check on /v1/* (and /metrics if asked), then a request-body size cap."""

    def __init__(self, app: Any, settings: Settings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self._keys = [k.encode() for k in settings.api_keys]

    def _authorized(self, scope: dict) -> bool:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        ok = False
        for key in self._keys:   # no early exit: same work whichever key matches
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        protected = (path.startswith("/v1/") or path in _TOKENIZER_PATHS
                     or (path == "/metrics" and self.settings.metrics_require_auth))
        if self._keys and protected and not self._authorized(scope):
            self.metrics.record_failure("unauthorized")
            return await _error(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                "invalid_request_error", None, "invalid_api_key")(scope, receive, send)
        limit = self.settings.max_request_body_bytes
        too_big = _error(413, f"request body larger than {limit} bytes", code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.metrics.record_failure("invalid_request")
            bad = too_big if length.isdigit() else _error(400, "invalid Content-Length header")
            return await bad(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    self.metrics.record_failure("invalid_request")
                    return await too_big(scope, receive, send)
                if not message.get("more_body", False):
                    break
            replay: list[dict] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            upstream = receive

            async def receive() -> dict:
                return replay.pop() if replay else await upstream()
        await self.app(scope, receive, send)


async def _listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def with_cancellation(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it if the client disconnects first (vLLM's pattern)."""
    handler = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_listen_for_disconnect(request))
    try:
        await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        handler.cancel()
        raise
    finally:
        listener.cancel()
    if handler.done():
        return handler.result()
    handler.cancel()
    try:
        await handler
    except BaseException:
        pass
    return Response(status_code=499)   # nobody is listening any more


def begin_drain(app: FastAPI) -> None:
    """Signal-safe: start draining (see EngineClient.begin_drain) on the app's event loop."""
    client = app.state.amusd.get("client")
    loop = getattr(client, "_loop", None)
    if client is not None and loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(client.begin_drain, app.state.amusd["settings"].shutdown_grace_s)


def create_app(settings: Settings, supervisor: Any = None, replica: dict | None = None) -> FastAPI:
    """`replica`: who serves (one replica of several, server/ray_serve.py); /health includes it."""
    state: dict[str, Any] = {"supervisor": supervisor, "settings": settings}

    def health() -> dict:
        sup = state["supervisor"]
        return sup.health() if sup is not None and getattr(state.get("client"), "started", False) else {}

    metrics = ServerMetrics(health=health, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                            names=settings.metrics_names)
    state["metrics"] = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sup = state["supervisor"] or await asyncio.to_thread(make_supervisor, settings)
        state["supervisor"] = sup
        client = EngineClient(sup, metrics, settings.queue_timeout_s)
        state["client"] = client
        try:
            await client.start()
            tokenizer = await asyncio.to_thread(load_tokenizer, sup.tokenizer_dir)
        except BaseException as exc:
            logger.error("engine failed to start: %s", exc)
            await asyncio.to_thread(sup.shutdown)
            raise
        root = getattr(getattr(sup, "config", None), "verify_model", None) or settings.model
        name = settings.served_model_name or (os.path.basename(os.path.normpath(root))
                                              if os.path.isdir(root) else root)
        defaults = load_sampling_defaults(settings.generation_config, sup.tokenizer_dir)
        state["serving"] = serving = OpenAIServing(
            settings, client, tokenizer, name, root, sup.max_model_len, sup.vocab_size,
            eos_token_ids=getattr(sup, "eos_token_ids", ()), sampling_defaults=defaults)
        metrics.set_model_name(name)
        logger.info("serving model %r (mode %s, max_model_len %d)", name, settings.mode, sup.max_model_len)
        logger.info("sampling defaults for fields a request leaves unset: %s (generation_config: %s%s)",
                    serving.params.defaults_in_force(), settings.generation_config,
                    f", from generation_config.json: {sorted(defaults)}" if defaults else ", none found")
        try:
            yield
        finally:
            await client.stop(timeout_s=10.0)

    app = FastAPI(title="amusd-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.amusd = state
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.record_failure("invalid_request")
        errors = exc.errors() or [{}]
        err = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
        if err.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if err.get("type") == "extra_forbidden":
            return _error(400, f"unknown parameter {where!r}: this server does not support it (an unsupported "
                               "parameter is refused, never silently ignored)", None, where)
        return _error(400, f"{where + ': ' if where else ''}{err.get('msg', 'invalid request')}", None, where or None)

    @app.exception_handler(OpenAIError)
    async def _on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        metrics.record_failure("invalid_request")
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(EngineClientError)
    async def _on_engine_error(request: Request, exc: EngineClientError) -> JSONResponse:
        response = _error(exc.status, str(exc), exc.type, None, exc.code)
        client = state.get("client")
        if exc.status in (429, 503) and client is not None:
            response.headers["Retry-After"] = str(client.retry_after_s())
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        metrics.record_failure("internal_error")
        return _error(500, f"internal error: {type(exc).__name__}", "internal_server_error")

    @app.get("/health")
    async def get_health() -> JSONResponse:
        client = state.get("client")
        ok = client is not None and client.is_ready()
        body = {"status": "ok" if ok else "unavailable", **(health() or {})}
        if replica is not None:
            body["replica"] = replica
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(state["serving"].models().model_dump(mode="json"))

    @app.get("/version")
    async def get_version() -> JSONResponse:
        return JSONResponse({"version": server_version()})

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest) -> JSONResponse:
        return JSONResponse(state["serving"].tokenize(body).model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest) -> JSONResponse:
        return JSONResponse(state["serving"].detokenize(body).model_dump(mode="json"))

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return await with_cancellation(request, state["serving"].create_completion(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return await with_cancellation(request, state["serving"].create_chat_completion(body))

    return app
