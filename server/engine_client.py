"""Bridge between the engine supervisor (thread callbacks) and the asyncio server.

The engine keeps the one line of requests (engine/admission.py): `admit` hands every request to
the supervisor at once, which refuses it when its line is full (-> 429) or when it could never
fit (-> 400), and calls back when it leaves the line for the workers. This client only waits:
a request not started within `queue_timeout_s` is taken out of the line (-> 503). EngineOutputs
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

from engine.admission import LineFull
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


class EngineRefusedError(EngineClientError):
    status, type, code = 400, "invalid_request_error", None           # the engine could never run it


class RequestHandle:
    """One admitted request: wait until the engine starts it, then iterate its EngineOutputs."""

    def __init__(self, client: "EngineClient", request: GenerationRequest) -> None:
        self.client, self.request = client, request
        self.request_id = request.request_id
        self.arrival = time.monotonic()
        self.dispatched_at: float | None = None      # when it left the engine's line for the workers
        self.first_token_at: float | None = None
        self.last_output_at: float | None = None
        self.finished = False
        self.abort_reason: str | None = None     # set when we cancel: "abort" (client) or "stop"
        self._dispatched = asyncio.Event()
        self._outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()

    @property
    def is_dispatched(self) -> bool:
        return self.dispatched_at is not None

    async def wait_dispatched(self) -> None:
        """Return once the engine has started the request; QueueTimeoutError after queue_timeout_s."""
        if self._dispatched.is_set():
            return
        remaining = self.client.queue_timeout_s - (time.monotonic() - self.arrival)
        try:
            await asyncio.wait_for(self._dispatched.wait(), max(0.0, remaining))
        except asyncio.TimeoutError:
            if self._dispatched.is_set():
                return
            self.client._give_up_waiting(self, failure="queue_timeout")
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
        """Stop this request (idempotent): taken out of the engine's line if waiting, cancelled if running."""
        if self.finished or self.abort_reason is not None:
            return
        self.abort_reason = reason
        self.client._abort(self)


class EngineClient:
    def __init__(self, supervisor: Any, metrics: ServerMetrics, queue_timeout_s: float = 60.0) -> None:
        self.supervisor, self.metrics = supervisor, metrics
        self.queue_timeout_s = queue_timeout_s
        self._ids = itertools.count(1)
        self._handles: dict[int, RequestHandle] = {}          # admitted and not finished, by request id
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
        for handle in list(self._handles.values()):
            if handle.is_dispatched:
                handle.abort("abort")
            else:
                self._give_up_waiting(handle, failure=None, notify=True)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything still queued or running, then shut the supervisor down."""
        self.closing = True
        running = [handle for handle in self._handles.values() if handle.is_dispatched]
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
        return sum(not handle.is_dispatched for handle in self._handles.values())

    @property
    def max_num_running(self) -> int:
        """Requests the engine decodes at once (known once it has started)."""
        return max(1, int(getattr(self.supervisor, "max_num_running", 1)))

    @property
    def num_running(self) -> int:
        return sum(handle.is_dispatched for handle in self._handles.values())

    def retry_after_s(self) -> int:
        """Whole seconds a refused client should wait: requests ahead (waiting and running) x recent
        mean engine time per request / places in the engine, at least 1."""
        if not self._recent_engine_s:
            return 1
        mean = sum(self._recent_engine_s) / len(self._recent_engine_s)
        return max(1, math.ceil(len(self._handles) * mean / self.max_num_running))

    # ---- admission -------------------------------------------------------------------
    def admit(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Hand a request to the engine's line, or raise at once: QueueFullError (429),
        EngineRefusedError (400), EngineUnavailableError / EngineFailedError (503)."""
        if not self.is_ready():
            self.metrics.record_failure("not_ready")
            raise EngineUnavailableError("the server is shutting down" if self.draining or self.closing
                                         else "the engine is not ready (starting or restarting)")
        handle = RequestHandle(self, GenerationRequest(next(self._ids), list(prompt_token_ids), params))
        self._handles[handle.request_id] = handle
        try:
            self.supervisor.submit(handle.request, self._on_engine_thread(self._deliver, handle),
                                   self._on_engine_thread(self._on_started, handle))
        except LineFull as exc:
            self._forget(handle, "queue_full")
            raise QueueFullError(str(exc)) from None
        except ValueError as exc:
            self._forget(handle, "invalid_request")
            raise EngineRefusedError(str(exc)) from None
        except Exception as exc:   # engine gone
            logger.error("submit failed for request %d: %s", handle.request_id, exc)
            self._forget(handle, "engine_error")
            raise EngineFailedError(f"submit failed: {exc}") from None
        self._update_gauges()
        return handle

    def _forget(self, handle: RequestHandle, failure: str) -> None:
        handle.finished = True
        self._handles.pop(handle.request_id, None)
        self.metrics.record_failure(failure)

    def _on_engine_thread(self, callback, handle: RequestHandle):
        """A callback for the supervisor's thread that runs `callback(handle, *args)` on the loop."""
        loop = self._loop

        def on_engine_thread(*args) -> None:
            try:
                loop.call_soon_threadsafe(callback, handle, *args)
            except RuntimeError:   # loop closed during shutdown
                pass
        return on_engine_thread

    def _on_started(self, handle: RequestHandle) -> None:
        """On the loop: the request left the engine's line for the workers."""
        if handle.finished or handle.is_dispatched:
            return
        handle.dispatched_at = time.monotonic()
        self.metrics.observe_queue_time(handle.dispatched_at - handle.arrival)
        handle._dispatched.set()
        self._update_gauges()

    def _deliver(self, handle: RequestHandle, out: EngineOutput) -> None:
        """On the loop: record timings, pass the output on."""
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
            self._handles.pop(handle.request_id, None)
            self._update_gauges()
        handle._dispatched.set()          # a request answered before it started (cancelled, failed) stops waiting
        handle._outputs.put_nowait(out)

    def _give_up_waiting(self, handle: RequestHandle, failure: str | None, notify: bool = False) -> None:
        """Take a request that has not started out of the engine's line: a queue timeout (`failure`)
        or a shutdown (`notify`: the waiter sees a cancelled finish it did not ask for -> 503)."""
        if handle.finished:
            return
        handle.finished = True
        self._handles.pop(handle.request_id, None)
        if failure:
            self.metrics.record_failure(failure)
        else:
            self.metrics.record_finished("abort", time.monotonic() - handle.arrival, None)
        if notify:
            handle._dispatched.set()
            handle._outputs.put_nowait(EngineOutput(handle.request_id, finished=True,
                                                    finish_reason="cancelled", error="server shutting down"))
        self._abort(handle)
        self._update_gauges()

    def _abort(self, handle: RequestHandle) -> None:
        """Cancel in the engine: it answers with a cancelled finish (see _deliver)."""
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
