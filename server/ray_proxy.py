"""A middleware for Ray Serve's HTTP proxy: a stream cut by a dying replica still ends properly.

When a replica dies mid-stream, Serve's proxy stops the response where it is (the client would see
an incomplete chunked body). `StreamEndGuard` sees that the app returned while an SSE body was
still open and finishes it the way the server ends any failed stream (server/serving.py): an
OpenAI error event, then `data: [DONE]`.

Serve adds proxy middlewares only from the environment of the proxy's process, so this is set
before the Ray node starts (`amusd serve-ray` does it for the local cluster it starts):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.ray_proxy:proxy_middlewares ray start --head ...
"""
from __future__ import annotations

import json
from typing import Any

from starlette.middleware import Middleware

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "server.ray_proxy:proxy_middlewares"
REPLICA_DIED = {"error": {"message": "the replica serving this request stopped mid-stream; retry the request",
                          "type": "service_unavailable", "param": None, "code": "replica_died"}}
STREAM_END = f"data: {json.dumps(REPLICA_DIED)}\n\ndata: [DONE]\n\n".encode()


class StreamEndGuard:
    """Pure ASGI: if the app returns with a text/event-stream body still open, send STREAM_END."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_sse, is_open = False, False

        async def tracking_send(message: dict) -> None:
            nonlocal is_sse, is_open
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                is_sse = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                is_open = bool(message.get("more_body", False))
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        finally:
            if is_sse and is_open:
                try:
                    await send({"type": "http.response.body", "body": STREAM_END, "more_body": False})
                except Exception:   # the client is gone too: nothing to finish
                    pass


def proxy_middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(StreamEndGuard)]
