"""A middleware for Ray Serve's HTTP proxy: what a dying replica leaves behind stays OpenAI-shaped.

Serve's proxy, when the replica serving a request dies, stops a stream where it is (the client
would see an incomplete chunked body), and answers a request that had no response yet with a bare
500 (or its own plain-text 503 / 429 / 408). `ProxyResponseGuard` makes each of these an answer the
OpenAI clients understand, as the server itself does (server/serving.py, server/app.py):

- an SSE body still open when the proxy returns -> an error event, then `data: [DONE]`;
- no response at all -> 503 with an OpenAI error body (`code: replica_died`: retry);
- an error response the proxy made itself (no `x-amusd-replica` header) -> the same status with an
  OpenAI error body (a proxy-made 500 becomes 503: it means the replica is gone).

Serve adds proxy middlewares only from the environment of the proxy's process, so this is set
before the Ray node starts (`amusd serve-ray` does it for the local cluster it starts):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.ray_proxy:proxy_middlewares ray start --head ...
"""
from __future__ import annotations

import json
from typing import Any

from starlette.middleware import Middleware

from server.replica import REPLICA_HEADER

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "server.ray_proxy:proxy_middlewares"
REPLICA_DIED_MESSAGE = "the replica serving this request stopped; retry the request"
_ERROR_TYPES = {429: ("rate_limit_exceeded", "queue_full"), 408: ("timeout", "timeout")}


def openai_error(message: str, status: int, code: str | None = None) -> dict:
    error_type, default_code = _ERROR_TYPES.get(status, ("service_unavailable", "replica_died"))
    return {"error": {"message": message, "type": error_type, "param": None, "code": code or default_code}}


REPLICA_DIED = openai_error(REPLICA_DIED_MESSAGE, 503)
STREAM_END = f"data: {json.dumps(REPLICA_DIED)}\n\ndata: [DONE]\n\n".encode()


async def send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class ProxyResponseGuard:
    """Pure ASGI, in front of Serve's proxy (see the module doc)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_started = is_sse = is_open = False
        replaced: dict | None = None          # a proxy-made error response being rewritten

        async def guarded_send(message: dict) -> None:
            nonlocal is_started, is_sse, is_open, replaced
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                is_started = True
                if message["status"] >= 400 and REPLICA_HEADER.encode() not in headers:
                    replaced = {"status": 503 if message["status"] == 500 else message["status"], "text": b""}
                    return
                is_sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                is_open = bool(message.get("more_body", False))
                if replaced is not None:
                    replaced["text"] += message.get("body", b"")
                    if not is_open:
                        text = replaced["text"].decode(errors="replace").strip()
                        message = REPLICA_DIED_MESSAGE if replaced["status"] == 503 or not text else text
                        await send_json(send, replaced["status"], openai_error(message, replaced["status"]))
                    return
            await send(message)
        try:
            await self.app(scope, receive, guarded_send)
        finally:
            try:
                if not is_started:
                    await send_json(send, 503, REPLICA_DIED)
                elif is_sse and is_open:
                    await send({"type": "http.response.body", "body": STREAM_END, "more_body": False})
            except Exception:   # the client is gone too: nothing to finish
                pass


def proxy_middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyResponseGuard)]
