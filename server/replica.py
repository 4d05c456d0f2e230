"""What one replica of several needs beyond `amusd serve`, without Ray (server/ray_serve.py uses it).

    settings = place_on_devices(settings, gpu_ids=["3", "5"])    # draft cuda:0, verify cuda:1
    health = EngineHealthCheck(unhealthy_after_s=600); health.check(app.state.amusd)   # raises if unhealthy
    app = ReplicaHeader(app, replica_id)                          # every response names its replica

Health mapping. Ray restarts a replica whose `check_health` raises. The engine heals a crashed or
hung worker itself (the supervisor restarts it in seconds), so only an engine that cannot heal is
unhealthy: one that gave up (`fatal_error`: a worker failed to start `max_restarts` times in a
row), or one that has not been ready for `unhealthy_after_s`. A replica that is shutting down
(draining) is not reported unhealthy: Ray is already replacing it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from server.settings import Settings

REPLICA_HEADER = "x-amusd-replica"


def place_on_devices(settings: Settings, gpu_ids: list) -> Settings:
    """Map the engine's two workers onto the GPUs Ray gave this replica.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs before the replica starts, and the worker
    processes inherit it, so the assigned GPUs are cuda:0 and cuda:1 whatever their host ids.
    Without GPUs the settings are kept (CPU). One GPU: both workers on it (warned about at start).
    """
    if not gpu_ids:
        return settings
    draft, verify = ("cuda:0", "cuda:1") if len(gpu_ids) >= 2 else ("cuda:0", "cuda:0")
    placed = settings.model_dump()
    placed.update(draft_device=draft, verify_device=verify, verify_cores=None, draft_cores=None,
                  prefill_cores=None)
    return Settings.model_validate(placed)


class EngineHealthCheck:
    """Raises RuntimeError when the replica's engine is beyond self-healing (see the module doc)."""

    def __init__(self, unhealthy_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.unhealthy_after_s, self._clock = unhealthy_after_s, clock
        self._not_ready_since: float | None = None

    def check(self, app_state: dict[str, Any]) -> None:
        supervisor, client = app_state.get("supervisor"), app_state.get("client")
        if supervisor is None or client is None or not client.started:
            raise RuntimeError("the engine has not started")
        fatal = getattr(supervisor, "fatal_error", None)
        if fatal:
            raise RuntimeError(f"the engine failed: {fatal}")
        if client.closing or client.draining or client.is_ready():
            self._not_ready_since = None
            return
        now = self._clock()
        if self._not_ready_since is None:
            self._not_ready_since = now
        if now - self._not_ready_since > self.unhealthy_after_s:
            raise RuntimeError(f"the engine has not been ready for {now - self._not_ready_since:.0f}s")


class ReplicaHeader:
    """Pure ASGI middleware: adds `x-amusd-replica: <id>` to every response (streams included)."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app, self._header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)
        await self.app(scope, receive, send_with_header)
