"""Shared fixtures.

    session_cache_dir    (autouse) AMUSD_CACHE_DIR of this session: nothing is read from ~/.cache/amusd
    byte_tokenizer_dir   a byte-level tokenizer dir with a chat template (no model)
    server               session-scoped REAL server: `python -m server.main --config configs/tiny.yaml`
                         in a subprocess on a free port, real EngineSupervisor + tiny random models.
                         Use server.base_url / server.url("/v1/...") / server.model / server.openai().
    LiveServer(...)      start another real server with extra CLI flags (see tests/test_server_busy.py)
    fake_server          factory: uvicorn in a thread with create_app(Settings(**kw), FakeSupervisor)
    model, draft_model   (module) the tiny random verify / draft model in float64, loaded in-process
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes import FakeSupervisor, build_byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TINY_MODEL_NAME = "tiny"          # served_model_name in configs/tiny.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m server.main --config configs/tiny.yaml --port P EXTRA...` in a subprocess."""

    def __init__(self, *extra_args: str, config: Path = TINY_CONFIG, env: dict | None = None,
                 ready_timeout_s: float = 120.0) -> None:
        self.extra_args, self.config, self.ready_timeout_s = list(extra_args), config, ready_timeout_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.model = TINY_MODEL_NAME
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def openai(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=kw.pop("api_key", "none"),
                             max_retries=0, **kw)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""

    def start(self) -> "LiveServer":
        for _attempt in range(3):          # a free port can be taken between probe and bind
            self.port = free_port()
            fd, self.log_path = tempfile.mkstemp(prefix="amusd-server-", suffix=".log")
            cmd = [sys.executable, "-m", "server.main", "--config", str(self.config), "--port",
                   str(self.port), "--host", "127.0.0.1", "--no-access-log", *self.extra_args]
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=fd, stderr=subprocess.STDOUT)
            os.close(fd)
            if self._wait_ready():
                return self
            if "address already in use" not in self.log().lower():
                break
        self.stop()
        raise RuntimeError(f"server did not become ready; log:\n{self.log()[-4000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it hangs. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """This session's own AMUSD_CACHE_DIR, set before any server or worker starts: tiny models and
    forward-cost caches are built fresh, never read stale from ~/.cache/amusd."""
    path = str(tmp_path_factory.mktemp("amusd-cache"))
    saved = os.environ.get("AMUSD_CACHE_DIR")
    os.environ["AMUSD_CACHE_DIR"] = path
    yield path
    if saved is None:
        os.environ.pop("AMUSD_CACHE_DIR", None)
    else:
        os.environ["AMUSD_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def model(session_cache_dir):
    from engine.models import load_causal_lm
    from engine.tiny_models import ensure_tiny_model
    return load_causal_lm(ensure_tiny_model("tiny-random/verify", session_cache_dir), None, "cpu", "float64")


@pytest.fixture(scope="module")
def draft_model(session_cache_dir):
    from engine.models import load_causal_lm
    from engine.tiny_models import ensure_tiny_model
    return load_causal_lm(ensure_tiny_model("tiny-random/draft", session_cache_dir), None, "cpu", "float64")


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> str:
    return build_byte_tokenizer(str(tmp_path_factory.mktemp("byte_tokenizer")))


@pytest.fixture(scope="session")
def server():
    """The real server on configs/tiny.yaml (context 4096 so that long requests are slow enough)."""
    live = LiveServer("--max-model-len", "4096", "--max-tokens-limit", "4096").start()
    yield live
    live.stop()


class FakeServer:
    def __init__(self, app, supervisor: FakeSupervisor, port: int) -> None:
        self.app, self.supervisor, self.port = app, supervisor, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.model = "fake"

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture
def fake_server(byte_tokenizer_dir):
    """Factory: `with fake_server(max_queue_size=1, delay_s=0.05) as fs:` -> FakeServer.

    Settings keywords go to Settings, the others (delay_s, text, tokens_per_step, ...) to FakeSupervisor;
    `tokenizer_dir=` replaces the byte tokenizer (tests/fakes.py build_byte_tokenizer variants).
    """
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    @contextlib.contextmanager
    def start(**kw):
        tokenizer_dir = kw.pop("tokenizer_dir", byte_tokenizer_dir)
        fake_kw = {k: kw.pop(k) for k in list(kw) if k not in Settings.model_fields}
        for name in ("max_model_len", "max_queue_size"):     # settings the fake engine applies itself
            if name in kw:
                fake_kw[name] = kw[name]
        sup = FakeSupervisor(tokenizer_dir, **fake_kw)
        app = create_app(Settings(served_model_name="fake", **kw), sup)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                            timeout_graceful_shutdown=2))
        thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.started, "fake server did not start"
        try:
            yield FakeServer(app, sup, sock.getsockname()[1])
        finally:
            srv.should_exit = True
            thread.join(10)
            sock.close()

    return start


# ---- session-end leak check --------------------------------------------------------------------
# After the whole session (every fixture torn down), fail the run (exit status 1) if
#   - a process started during the session is still alive: found by an env marker every
#     subprocess inherits (so orphans re-parented to init are found too, and a concurrent test
#     session on the same machine is not), except this process's own multiprocessing resource
#     tracker, which lives as long as pytest does;
#   - a /dev/shm/amusd-* segment created during the session still exists and is not mapped by
#     some other session's process.
# A short grace period lets workers and resource trackers finish exiting. Leftovers are then
# reported, killed / unlinked, so that they do not pile up on the machine.
_LEAK_MARKER = "AMUSD_TEST_SESSION"
os.environ[_LEAK_MARKER] = f"{os.getpid()}-{time.time_ns()}"
_SESSION_MARK = os.environ[_LEAK_MARKER]
_SHM_DIR = Path("/dev/shm")
_SHM_AT_START = {p.name for p in _SHM_DIR.glob("amusd-*")} if _SHM_DIR.is_dir() else set()
_LEAK_GRACE_S = 10.0


def _session_processes() -> list:
    """Live processes (not this one, not zombies) that carry this session's marker."""
    import psutil
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "ppid"]):
        try:
            if proc.pid == me or proc.environ().get(_LEAK_MARKER) != _SESSION_MARK:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            if proc.ppid() == me and "multiprocessing.resource_tracker" in cmdline:
                continue
            found.append((proc, cmdline))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _leaked_segments(ours: set[int]) -> list[str]:
    """amusd-* segments created during the session that no other session's process maps."""
    new = {p.name for p in _SHM_DIR.glob("amusd-*")} - _SHM_AT_START if _SHM_DIR.is_dir() else set()
    if not new:
        return []
    foreign: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if int(maps.parent.name) in ours:
                continue
            text = maps.read_text(errors="replace")
        except (OSError, ValueError):
            continue
        foreign |= {name for name in new if f"/dev/shm/{name}" in text}
    return sorted(new - foreign)


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not Path("/proc").is_dir():
        return      # an xdist worker (the controller checks), or not Linux
    deadline = time.monotonic() + _LEAK_GRACE_S
    while True:
        procs = _session_processes()
        segments = _leaked_segments({os.getpid()} | {p.pid for p, _ in procs})
        if (not procs and not segments) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if not procs and not segments:
        return
    lines = [f"pid {p.pid}: {cmd[:200]}" for p, cmd in procs] + [f"/dev/shm/{n}" for n in segments]
    message = ("LEAK CHECK FAILED: still there after the test session (and 10 s of grace), "
               "now killed / unlinked:\n  " + "\n  ".join(lines))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("!", "leak check", red=True)
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    for proc, _ in procs:
        with contextlib.suppress(Exception):
            proc.kill()
    for name in segments:
        with contextlib.suppress(OSError):
            (_SHM_DIR / name).unlink()
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
