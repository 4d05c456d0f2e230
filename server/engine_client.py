"""Bridge between the engine supervisor (thread callbacks) and the asyncio server.

The engine runs up to `supervisor.max_num_running` requests at once (1 until the verify worker
batches, issue #10). This client keeps its own bounded FIFO in front of it and hands the supervisor
the next request only when one of those places is free, so it knows exactly what is waiting (-> 429
when full, 503 after `queue_timeout_s`) and what is running. EngineOutputs
arrive on the supervisor's thread and are moved onto the event loop with call_soon_threadsafe.
Latency metrics (queue time, TTFT, inter-token, e2e) and per-request stats are recorded here, and
the recent engine time per request, from which a 429 / 503 gets its Retry-After estimate.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from typing import Any, AsyncIterator

from engine.messages import EngineOutput, GenerationRequest, SamplingParams
from server.metrics import ServerMetrics
from server.settings import DEFAULT_MODEL, Settings

logger = logging.getLogger("amusd.server")
NUM_RECENT_REQUESTS = 32   # Retry-After: mean engine time over this many recent requests


class EngineClientError(Exception):
    status, type, code = 503, "service_unavailable", None


class QueueFullError(EngineClientError):
    status, type, code = 429, "rate_limit_exceeded", "queue_full"


class QueueTimeoutError(EngineClientError):
    status, type, code = 503, "service_unavailable", "queue_timeout"


class EngineUnavailableError(EngineClientError):
    status, type, code = 503, "service_unavailable", "engine_not_ready"


class EngineFailedError(EngineClientError):
    status, type, code = 503, "service_unavailable", "engine_error"   # a worker failed: retry after restart


class RequestHandle:
    """One admitted request: wait until the engine starts it, then iterate its EngineOutputs."""

    def __init__(self, client: "EngineClient", request: GenerationRequest) -> None:
        self.client, self.request = client, request
        self.request_id = request.request_id
        self.arrival = time.monotonic()
        self.dispatched_at: float | None = None
        self.first_token_at: float | None = None
        self.last_output_at: float | None = None
        self.finished = False
        self.abort_reason: str | None = None     # set when we cancel: "abort" (client) or "stop"
        self._dispatched = asyncio.Event()
        self._outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()

    async def wait_dispatched(self) -> None:
        """Return once the engine has the request; QueueTimeoutError after queue_timeout_s."""
        if self._dispatched.is_set():
            return
        remaining = self.client.queue_timeout_s - (time.monotonic() - self.arrival)
        try:
            await asyncio.wait_for(self._dispatched.wait(), max(0.0, remaining))
        except asyncio.TimeoutError:
            if self._dispatched.is_set():
                return
            self.client._drop_waiting(self, failure="queue_timeout")
            raise QueueTimeoutError(f"request waited more than {self.client.queue_timeout_s:g}s "
                                    "for the engine; try again later") from None

    async def outputs(self, timeout: float | None = None) -> AsyncIterator[EngineOutput]:
        """EngineOutputs until (and including) the finished one; timeout applies per item."""
        while True:
            out = await asyncio.wait_for(self._outputs.get(), timeout)
            yield out
            if out.finished:
                return

    def abort(self, reason: str = "abort") -> None:
        """Stop this request (idempotent): dropped if waiting, cancelled in the engine if running."""
        if self.finished or self.abort_reason is not None:
            return
        self.abort_reason = reason
        self.client._abort(self)


class EngineClient:
    def __init__(self, supervisor: Any, metrics: ServerMetrics, max_queue_size: int = 16,
                 queue_timeout_s: float = 60.0) -> None:
        self.supervisor, self.metrics = supervisor, metrics
        self.max_queue_size, self.queue_timeout_s = max_queue_size, queue_timeout_s
        self._ids = itertools.count(1)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: dict[int, RequestHandle] = {}          # by request id, at most max_num_running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent_engine_s: collections.deque[float] = collections.deque(maxlen=NUM_RECENT_REQUESTS)
        self.started = self.closing = self.draining = False

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.supervisor.start)
        self.started = True

    def begin_drain(self, grace_s: float) -> None:
        """On SIGTERM: refuse new requests (503, /health 503); cancel what is left after grace_s,
        so that unfinished streams still end with an error event and [DONE]."""
        if self.draining or self._loop is None:
            return
        self.draining = True
        logger.info("draining: %d running, %d waiting; what is left in %.1fs gets cancelled",
                    self.num_running, self.num_waiting, grace_s)
        self._loop.call_later(grace_s, self.cancel_all)

    def cancel_all(self) -> None:
        while self._waiting:
            self._drop_waiting(self._waiting[0], failure=None, notify=True)
        for handle in list(self._running.values()):
            handle.abort("abort")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything still queued or running, then shut the supervisor down."""
        self.closing = True
        running = list(self._running.values())
        self.cancel_all()
        deadline = time.monotonic() + min(timeout_s, 5.0)
        while any(not handle.finished for handle in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self.supervisor.shutdown, timeout_s)

    def is_ready(self) -> bool:
        if not self.started or self.closing or self.draining:
            return False
        try:
            return bool(self.supervisor.is_healthy())
        except Exception:
            return False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def max_num_running(self) -> int:
        """Requests the engine decodes at once (known once it has started)."""
        return max(1, int(getattr(self.supervisor, "max_num_running", 1)))

    @property
    def num_running(self) -> int:
        return len(self._running)

    def retry_after_s(self) -> int:
        """Whole seconds a refused client should wait: requests ahead (waiting and running) x recent
        mean engine time per request / places in the engine, at least 1."""
        if not self._recent_engine_s:
            return 1
        mean = sum(self._recent_engine_s) / len(self._recent_engine_s)
        return max(1, math.ceil((self.num_waiting + self.num_running) * mean / self.max_num_running))

    # ---- admission -------------------------------------------------------------------
    def admit(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request or raise QueueFullError / EngineUnavailableError at once."""
        if not self.is_ready():
            self.metrics.record_failure("not_ready")
            raise EngineUnavailableError("the server is shutting down" if self.draining or self.closing
                                         else "the engine is not ready (starting or restarting)")
        busy = len(self._running) >= self.max_num_running or bool(self._waiting)
        if busy and len(self._waiting) >= self.max_queue_size:
            self.metrics.record_failure("queue_full")
            raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are already "
                                 "waiting; try again later")
        handle = RequestHandle(self, GenerationRequest(next(self._ids), list(prompt_token_ids), params))
        self._waiting.append(handle)
        self._dispatch_next()
        self._update_gauges()
        return handle

    def _dispatch_next(self) -> None:
        while len(self._running) < self.max_num_running and self._waiting and not self.closing:
            handle = self._waiting.popleft()
            handle.dispatched_at = time.monotonic()
            self.metrics.observe_queue_time(handle.dispatched_at - handle.arrival)
            self._running[handle.request_id] = handle
            handle._dispatched.set()
            try:
                self.supervisor.submit(handle.request, self._callback(handle))
            except Exception as exc:   # engine gone: fail this request, try the next
                logger.error("submit failed for request %d: %s", handle.request_id, exc)
                self._deliver(handle, EngineOutput(handle.request_id, finished=True,
                                                   finish_reason="error", error=f"submit failed: {exc}"))
        self._update_gauges()

    def _callback(self, handle: RequestHandle):
        loop = self._loop

        def on_output(out: EngineOutput) -> None:      # supervisor thread
            try:
                loop.call_soon_threadsafe(self._deliver, handle, out)
            except RuntimeError:   # loop closed during shutdown
                pass
        return on_output

    def _deliver(self, handle: RequestHandle, out: EngineOutput) -> None:
        """On the loop: record timings, pass the output on, start the next request when done."""
        if handle.finished:
            return
        now = time.monotonic()
        if out.token_ids:
            if handle.first_token_at is None:
                handle.first_token_at = now
                self.metrics.observe_first_token(now - handle.arrival)
            elif handle.last_output_at is not None:
                self.metrics.observe_inter_token(now - handle.last_output_at)
            handle.last_output_at = now
        if out.finished:
            handle.finished = True
            reason = out.finish_reason or "error"
            if reason == "cancelled":
                reason = handle.abort_reason or "abort"
            self.metrics.record_finished(reason, now - handle.arrival, out.stats)
            if handle.dispatched_at is not None:
                self._recent_engine_s.append(now - handle.dispatched_at)
            if self._running.get(handle.request_id) is handle:
                del self._running[handle.request_id]
                self._dispatch_next()
        handle._outputs.put_nowait(out)

    def _drop_waiting(self, handle: RequestHandle, failure: str | None, notify: bool = False) -> None:
        try:
            self._waiting.remove(handle)
        except ValueError:
            return
        handle.finished = True
        if failure:
            self.metrics.record_failure(failure)
        else:
            self.metrics.record_finished("abort", time.monotonic() - handle.arrival, None)
        if notify:   # wake the waiter: it sees a cancelled finish it did not ask for -> 503
            handle._dispatched.set()
            handle._outputs.put_nowait(EngineOutput(handle.request_id, finished=True,
                                                    finish_reason="cancelled", error="server shutting down"))
        self._update_gauges()

    def _abort(self, handle: RequestHandle) -> None:
        if handle in self._waiting:
            self._drop_waiting(handle, failure=None)
        elif self._running.get(handle.request_id) is handle:
            try:
                self.supervisor.cancel(handle.request_id)
            except Exception as exc:
                logger.warning("cancel of request %d failed: %s", handle.request_id, exc)

    def _update_gauges(self) -> None:
        self.metrics.set_queue_state(self.num_running, self.num_waiting)


def resolve_models(settings: Settings) -> tuple[str, str | None]:
    """(verify, draft) model specs; 'default' fetches the default pair (in a subprocess, so that
    this process never imports torch)."""
    verify, draft = settings.model, (None if settings.mode == "ar" else settings.draft_model)
    if DEFAULT_MODEL not in (verify, draft):
        return verify, draft
    code = ("import json, sys; from engine.fetch import ensure_default_models; "
            "print('AMUSD_DIRS=' + json.dumps(ensure_default_models(sys.argv[1])))")
    logger.info("model 'default': making sure the default pair is in %s (first start downloads it)",
                settings.cache_dir)
    proc = subprocess.run([sys.executable, "-c", code, settings.cache_dir], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("AMUSD_DIRS=")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"fetching the default models failed (exit {proc.returncode}); "
                           "run `amusd fetch-models` to see why")
    verify_dir, draft_dir = json.loads(line.split("=", 1)[1])
    return (verify_dir if verify == DEFAULT_MODEL else verify,
            draft_dir if draft == DEFAULT_MODEL else draft)


def make_supervisor(settings: Settings) -> Any:
    """Build (not start) the real EngineSupervisor for these settings. Raises ConfigError."""
    from engine.supervisor import EngineSupervisor   # torch-free by contract
    verify, draft = resolve_models(settings)
    return EngineSupervisor(settings.to_engine_config(verify_model=verify, draft_model=draft))
