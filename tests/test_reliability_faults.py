"""Faults over HTTP against the REAL server (configs/tiny.yaml, async mode), one server per test.

    kill -9 the draft / the verify worker in the middle of a streamed chat request:
        the stream ends promptly with an error event + [DONE]; /health is 503 during the restart
        and 200 again within 60 s; requests queued behind the crashed one, and requests sent while
        it restarts, are each either served (with the right greedy text) or a clean 503;
        greedy output after the restart equals greedy output before the crash
    a draft model that does not exist: the server exits quickly, non-zero, saying why
        (the missing verify model is tests/test_server_busy.py::test_engine_start_failure_...)
    the frontend killed (SIGKILL) or stopped (SIGTERM, SIGINT) with a stream in flight:
        its workers (PR_SET_PDEATHSIG) and every other descendant are gone within 10 s, and its
        /dev/shm/amusd-* segment is unlinked (by the supervisor, or after SIGKILL by the
        multiprocessing resource tracker) within 10 s

Figures (restart times, how long the broken stream took to end) are printed: run with -s.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import LiveServer

CHAT = [{"role": "user", "content": "Tell me a long story about a server that never loses a request."}]
GREEDY = {"max_tokens": 24, "temperature": 0}
LONG_STREAM = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
NUM_QUEUED = 3            # requests waiting behind the one that crashes
NUM_DURING_RESTART = 3    # requests sent while the worker restarts


# ---- helpers ---------------------------------------------------------------------------------

def wait_for(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def chat(live: LiveServer, timeout: float = 90, **kw) -> httpx.Response:
    return httpx.post(live.url("/v1/chat/completions"), timeout=timeout,
                      json={"model": live.model, "messages": CHAT, **GREEDY, **kw})


def greedy_text(live: LiveServer) -> str:
    resp = chat(live)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def assert_openai_error_body(obj: dict) -> dict:
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], obj
    return err


def health_status(live: LiveServer) -> int:
    try:
        return httpx.get(live.url("/health"), timeout=2).status_code
    except httpx.HTTPError:
        return -1


def metric(live: LiveServer, name: str) -> float:
    text = httpx.get(live.url("/metrics"), timeout=5).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def shm_segments_of(pid: int) -> set[str]:
    """Names of the /dev/shm/amusd-* segments process `pid` has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return set(re.findall(r"/dev/shm/(amusd-[0-9a-f]+)", f.read()))


def is_gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class StreamReader(threading.Thread):
    """Reads one SSE response in the background; `started` is set after `min_chunks` content chunks."""

    def __init__(self, live: LiveServer, path: str, body: dict, min_chunks: int = 3) -> None:
        super().__init__(daemon=True)
        self.live, self.path, self.body, self.min_chunks = live, path, body, min_chunks
        self.status: int | None = None
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.started = threading.Event()

    def run(self) -> None:
        num_chunks = 0
        try:
            with httpx.stream("POST", self.live.url(self.path), json=self.body, timeout=60) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    self.events.append(line[len("data: "):])
                    if '"content"' in line or '"text"' in line:
                        num_chunks += 1
                        if num_chunks >= self.min_chunks:
                            self.started.set()
        except BaseException as exc:   # noqa: BLE001 - the test inspects it
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


class InThread(threading.Thread):
    def __init__(self, fn, *args, **kw) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.result = self.error = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kw)
        except BaseException as exc:   # noqa: BLE001
            self.error = exc


class HealthPoller(threading.Thread):
    """Polls /health every 50 ms; records (time, status) until it sees 200 after a non-200."""

    def __init__(self, live: LiveServer, timeout_s: float = 60) -> None:
        super().__init__(daemon=True)
        self.live, self.timeout_s = live, timeout_s
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        seen_down = False
        while time.monotonic() < deadline:
            status = health_status(self.live)
            self.samples.append((time.monotonic(), status))
            seen_down |= status != 200
            if seen_down and status == 200:
                return
            time.sleep(0.05)

    def first(self, predicate, after: float = 0.0) -> float | None:
        return next((t for t, s in self.samples if t >= after and predicate(s)), None)


@pytest.fixture
def live():
    server = LiveServer().start()
    yield server
    server.stop()


# ---- kill -9 a worker mid-stream -------------------------------------------------------------

@pytest.mark.parametrize("role", ["draft", "verify"])
def test_kill_worker_mid_stream(live, role):
    expected = greedy_text(live)
    assert greedy_text(live) == expected              # greedy is deterministic to begin with
    old_pid = httpx.get(live.url("/health")).json()["workers"][role]["pid"]

    stream = StreamReader(live, "/v1/chat/completions",
                          {"model": live.model, "messages": CHAT, **LONG_STREAM})
    stream.start()
    assert stream.started.wait(60) and stream.error is None, stream.error
    queued = [InThread(chat, live) for _ in range(NUM_QUEUED)]
    for t in queued:
        t.start()
    assert wait_for(lambda: metric(live, "amusd:num_requests_waiting") == NUM_QUEUED, 10), \
        "the queued requests never showed up as waiting"

    poller = HealthPoller(live)
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    poller.start()
    time.sleep(0.2)                                   # the supervisor notices within its 20 ms poll
    during = [InThread(chat, live) for _ in range(NUM_DURING_RESTART)]
    for t in during:
        t.start()

    # the broken stream ends promptly: an error event, then [DONE]; no clean finish_reason
    stream.join(30)
    assert not stream.is_alive(), "the stream of the crashed request hangs"
    stream_end_s = stream.ended_at - killed_at
    assert stream_end_s < 30            # vs the 300 s step timeout a hang would take
    assert stream.error is None, f"the stream broke instead of ending: {stream.error!r}"
    assert stream.status == 200 and stream.events[-1] == "[DONE]", stream.events[-3:]
    last = json.loads(stream.events[-2])
    err = assert_openai_error_body(last)
    assert err["code"] == "engine_error", err
    chunks = [json.loads(e) for e in stream.events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any(ch.get("finish_reason") for c in chunks for ch in c["choices"]), \
        "a crashed request must not look finished"

    # /health: 503 during the restart, 200 again within 60 s
    poller.join(65)
    down_at = poller.first(lambda s: s == 503)
    assert down_at is not None, f"/health never reported 503: {poller.samples[:5]}"
    up_at = poller.first(lambda s: s == 200, after=down_at)
    assert up_at is not None, f"/health not 200 again within 60 s: {httpx.get(live.url('/health')).text}\n" \
                              f"server log (end):\n{live.log()[-3000:]}"
    restart_s = up_at - killed_at
    health = httpx.get(live.url("/health")).json()
    assert health["workers"][role]["pid"] != old_pid and health["workers"][role]["num_restarts"] >= 1

    # nothing vanished: every queued / concurrent request was served correctly or got a clean 503
    outcomes = {"served": 0, "503": 0}
    for t in queued + during:
        t.join(90)
        assert not t.is_alive(), "a request hangs after the restart"
        assert t.error is None, f"a request was lost: {t.error!r}"
        resp = t.result
        if resp.status_code == 200:
            assert resp.json()["choices"][0]["message"]["content"] == expected
            outcomes["served"] += 1
        else:
            assert resp.status_code == 503, resp.text
            assert_openai_error_body(resp.json())
            outcomes["503"] += 1
    assert sum(outcomes.values()) == NUM_QUEUED + NUM_DURING_RESTART
    assert outcomes["served"] >= 1, "nothing queued behind the crash was served after the restart"

    assert greedy_text(live) == expected
    assert metric(live, "amusd:num_requests_running") == 0 and metric(live, "amusd:num_requests_waiting") == 0
    print(f"\n[faults] kill -9 {role}: stream ended after {stream_end_s:.2f}s, /health 503 after "
          f"{down_at - killed_at:.2f}s, 200 again after {restart_s:.2f}s; queued+concurrent "
          f"{NUM_QUEUED}+{NUM_DURING_RESTART}: {outcomes}")


# ---- start-up failure ------------------------------------------------------------------------

def test_missing_draft_model_exits_quickly_with_a_clear_message():
    live = LiveServer("--draft-model", "/nonexistent/draft-model", "--max-restarts", "1",
                      ready_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="draft worker failed to start: .*model directory not found: "
                                           "/nonexistent/draft-model"):
        live.start()
    code = live.proc.wait(60)
    assert time.monotonic() - started < 60
    assert code == 1                  # server/main.py: 1 = start-up failed
    print(f"\n[faults] missing draft model: exit {code} after {time.monotonic() - started:.1f}s")


# ---- the frontend goes away ------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_frontend_exit_leaves_no_orphans_and_no_shared_memory(sig):
    live = LiveServer("--shutdown-grace-s", "1").start()
    try:
        server = psutil.Process(live.proc.pid)
        workers = {role: w["pid"] for role, w in httpx.get(live.url("/health")).json()["workers"].items()}
        descendants = server.children(recursive=True)
        assert set(workers.values()) <= {p.pid for p in descendants}
        segments = shm_segments_of(server.pid)
        assert segments and all(os.path.exists(f"/dev/shm/{name}") for name in segments)

        stream = StreamReader(live, "/v1/chat/completions",
                              {"model": live.model, "messages": CHAT, **LONG_STREAM})
        stream.start()
        assert stream.started.wait(60)
        sent_at = time.monotonic()
        live.proc.send_signal(sig)
        code = live.proc.wait(30)
        if sig != signal.SIGKILL:
            assert code == 0, live.log()[-3000:]
        stream.join(15)
        assert not stream.is_alive()
        if sig != signal.SIGKILL:   # drained: the cut-off stream still ends with an error event + [DONE]
            assert stream.events[-1] == "[DONE]", stream.events[-3:]

        assert wait_for(lambda: all(is_gone(p) for p in descendants), 10), \
            f"orphans after {sig.name}: {[p.pid for p in descendants if not is_gone(p)]} (workers {workers})"
        procs_gone_s = time.monotonic() - sent_at
        assert wait_for(lambda: not any(os.path.exists(f"/dev/shm/{n}") for n in segments), 10), \
            f"shared memory left after {sig.name}: {segments}"
        print(f"\n[faults] {sig.name} to the frontend: exit code {code}, {len(descendants)} descendants "
              f"gone after {procs_gone_s:.2f}s, shm gone after {time.monotonic() - sent_at:.2f}s")
    finally:
        live.stop()
