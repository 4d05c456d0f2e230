"""Shared fixtures.

    byte_tokenizer_dir   a byte-level tokenizer dir with a chat template (no model)
    server               session-scoped REAL server: `python -m server.main --config configs/tiny.yaml`
                         in a subprocess on a free port, real EngineSupervisor + tiny random models.
                         Use server.base_url / server.url("/v1/...") / server.model / server.openai().
    LiveServer(...)      start another real server with extra CLI flags (see tests/test_server_busy.py)
    fake_server          factory: uvicorn in a thread with create_app(Settings(**kw), FakeSupervisor)
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

    Settings keywords go to Settings, the others (delay_s, text, tokens_per_step, ...) to FakeSupervisor.
    """
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    @contextlib.contextmanager
    def start(**kw):
        fake_kw = {k: kw.pop(k) for k in list(kw) if k not in Settings.model_fields}
        sup = FakeSupervisor(byte_tokenizer_dir, **fake_kw)
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
