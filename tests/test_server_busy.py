"""Real server with a tiny queue: 429 when full, 503 after the queue timeout, graceful SIGTERM.

One server for the module (max_queue_size=1, queue_timeout_s=2); the SIGTERM test runs last and
stops it (tests in a module run in file order).
"""
from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import LiveServer

LONG = {"prompt": "slow", "max_tokens": 4000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def busy_server():
    live = LiveServer("--max-queue-size", "1", "--queue-timeout-s", "2", "--max-model-len", "4096",
                      "--max-tokens-limit", "4096", "--shutdown-grace-s", "15").start()
    yield live
    live.stop()


def start_long_stream(server):
    """Open a long streaming request and return (context, line iterator) once it produces tokens."""
    ctx = httpx.stream("POST", server.url("/v1/completions"), json={"model": server.model, **LONG}, timeout=60)
    resp = ctx.__enter__()
    assert resp.status_code == 200
    lines = resp.iter_lines()
    next(lines)
    return ctx, lines


def in_thread(fn, *args):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn(*args)))
    t.start()
    return t, box


def wait_waiting(server, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"amusd:num_requests_waiting {float(n)}" in httpx.get(server.url("/metrics")).text:
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {n} waiting requests")


def short(server, max_tokens=3, timeout=60):
    return httpx.post(server.url("/v1/completions"), timeout=timeout,
                      json={"model": server.model, "prompt": "hi", "max_tokens": max_tokens})


def test_queue_full_gives_429_at_once(busy_server):
    ctx, _ = start_long_stream(busy_server)                 # running
    waiter, box = in_thread(short, busy_server)             # waiting (queue now full)
    wait_waiting(busy_server, 1)
    resp = short(busy_server)
    assert resp.status_code == 429, resp.text
    assert waiter.is_alive(), "the 429 must come while the queue is still full, not after a wait"
    assert resp.json()["error"]["code"] == "queue_full"
    ctx.__exit__(None, None, None)                          # hang up: the waiter starts promptly
    waiter.join(30)
    assert not waiter.is_alive() and box["r"].status_code == 200


def test_queue_timeout_gives_503(busy_server):
    ctx, _ = start_long_stream(busy_server)
    try:
        t0 = time.monotonic()
        resp = short(busy_server)                           # waits 2 s behind the long request
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "queue_timeout"
        assert 1.5 < time.monotonic() - t0 < 30      # the 2 s queue timeout, not the end of the long request
    finally:
        ctx.__exit__(None, None, None)
    assert short(busy_server).status_code == 200


def _stops_accepting(live, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(live.url("/health"), timeout=2)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


def test_sigterm_finishes_in_flight_then_exits_without_orphans(busy_server):
    pids = [w["pid"] for w in httpx.get(busy_server.url("/health")).json()["workers"].values()]
    assert all(psutil.pid_exists(p) for p in pids)
    body = {"model": busy_server.model, "prompt": "bye", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", busy_server.url("/v1/completions"), json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        busy_server.proc.send_signal(15)
        assert _stops_accepting(busy_server, timeout_s=20), "still accepting connections after SIGTERM"
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
    assert busy_server.proc.wait(30) == 0, busy_server.log()[-3000:]
    assert "draining: 1 running" in busy_server.log()

    def gone(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    assert all(gone(p) for p in pids), "worker processes survived the server"


def test_engine_start_failure_exits_1_with_a_clear_message():
    live = LiveServer("--model", "/nonexistent/verify-model", "--max-restarts", "1")
    with pytest.raises(RuntimeError, match="model directory not found: /nonexistent/verify-model"):
        live.start()
    assert live.proc.wait(30) == 1
