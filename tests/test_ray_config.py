"""The Ray Serve deployment's parts that need no Ray cluster (most need no Ray at all).

Config files and their checks (server/ray_config.py), device placement, the health mapping and
the replica header (server/replica.py), the proxy's stream-end guard (server/ray_proxy.py) and
`amusd serve-ray`'s errors (server/ray_main.py). The cluster itself: tests/test_ray_serve.py.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi import FastAPI
from starlette.responses import StreamingResponse
from starlette.testclient import TestClient

from server.ray_config import RayConfigError, load_ray_config
from server.ray_proxy import REPLICA_DIED, STREAM_END, ProxyResponseGuard, proxy_middlewares
from server.replica import REPLICA_HEADER, EngineHealthCheck, ReplicaHeader, place_on_devices
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def write_config(tmp_path: Path, **keys) -> str:
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump({"settings_file": str(CONFIGS / "tiny.yaml"), **keys}))
    return str(path)


# --- config files ---------------------------------------------------------------------------------

def test_default_ray_config_serves_the_default_pair_and_the_tiny_one_tiny_models():
    config = load_ray_config(str(CONFIGS / "ray.yaml"))
    settings = config.engine_settings()
    assert (settings.model, settings.draft_model) == ("default", "default")
    assert settings.verify_cores is None and settings.draft_cores is None    # replicas share hosts
    assert config.autoscaling.min_replicas <= config.autoscaling.max_replicas
    tiny = load_ray_config(str(CONFIGS / "ray-tiny.yaml")).engine_settings()
    assert (tiny.model, tiny.draft_model) == ("tiny-random/verify", "tiny-random/draft")


def test_queue_too_small_for_max_ongoing_requests_is_refused(tmp_path):
    path = write_config(tmp_path, max_ongoing_requests=8, settings={"max_queue_size": 3})
    with pytest.raises(RayConfigError, match="max_queue_size"):
        load_ray_config(path)
    load_ray_config(write_config(tmp_path, max_ongoing_requests=8, settings={"max_queue_size": 7}))


@pytest.mark.parametrize("keys, words", [
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}}, "initial_replicas"),
    ({"num_gpu": 2}, "num_gpu"),
    ({"settings": {"mode": "fastest"}}, "mode"),
    ({"settings": {"no_such_setting": 1}}, "no_such_setting"),
    ({"settings_file": "missing.yaml"}, "missing.yaml"),
])
def test_bad_ray_config_names_the_key(tmp_path, keys, words):
    with pytest.raises(RayConfigError, match=words):
        load_ray_config(write_config(tmp_path, **keys))


def test_missing_config_file(tmp_path):
    with pytest.raises(RayConfigError, match="not found"):
        load_ray_config(str(tmp_path / "nope.yaml"))


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_autoscaling_and_actor_options_are_what_ray_serve_accepts():
    serve_config = pytest.importorskip("ray.serve.config", reason="Ray Serve is an optional extra")
    config = load_ray_config(str(CONFIGS / "ray-tiny.yaml"))
    autoscaling = serve_config.AutoscalingConfig(**config.autoscaling_config())
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.initial_replicas) == (1, 2, 2)
    options = config.ray_actor_options("/repo")
    assert options["num_gpus"] == 0 and options["num_cpus"] == 1
    assert options["runtime_env"] == {"env_vars": {"PYTHONPATH": "/repo"}}


# --- devices ----------------------------------------------------------------------------------------

def test_two_assigned_gpus_map_to_draft_cuda0_and_verify_cuda1():
    settings = Settings(model="tiny-random/verify", draft_model="tiny-random/draft")
    placed = place_on_devices(settings, ["6", "7"])      # CUDA_VISIBLE_DEVICES=6,7 -> cuda:0, cuda:1
    assert (placed.draft_device, placed.verify_device) == ("cuda:0", "cuda:1")
    assert placed.verify_cores is None and placed.draft_cores is None
    placed.to_engine_config()
    assert place_on_devices(settings, []) is settings
    assert place_on_devices(settings, ["3"]).verify_device == "cuda:0"


# --- health mapping -----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def engine_state(is_ready=True, fatal_error=None, draining=False):
    client = SimpleNamespace(started=True, closing=False, draining=draining, is_ready=lambda: is_ready)
    return {"client": client, "supervisor": SimpleNamespace(fatal_error=fatal_error)}


def test_failed_engine_is_unhealthy_at_once():
    with pytest.raises(RuntimeError, match="gave up"):
        EngineHealthCheck(600).check(engine_state(is_ready=False, fatal_error="gave up"))


def test_restarting_worker_is_healthy_until_the_grace_runs_out():
    clock = Clock()
    check = EngineHealthCheck(60, clock=clock)
    check.check(engine_state(is_ready=False))        # the supervisor is restarting a worker
    clock.now = 59
    check.check(engine_state(is_ready=False))
    clock.now = 61
    with pytest.raises(RuntimeError, match="not been ready"):
        check.check(engine_state(is_ready=False))
    check.check(engine_state(is_ready=True))          # ready again: the clock starts over
    clock.now = 200
    check.check(engine_state(is_ready=False))
    check.check(engine_state(is_ready=False, draining=True))   # shutting down is not a failure


def test_engine_not_started_is_unhealthy():
    with pytest.raises(RuntimeError, match="not started"):
        EngineHealthCheck(600).check({})


# --- replica header and the proxy's stream guard --------------------------------------------------------

def test_replica_header_on_plain_and_streaming_responses():
    app = FastAPI()

    @app.get("/plain")
    def plain() -> dict:
        return {"ok": True}

    @app.get("/stream")
    def stream() -> StreamingResponse:
        return StreamingResponse(iter([b"data: 1\n\n", b"data: [DONE]\n\n"]), media_type="text/event-stream")
    app.add_middleware(ReplicaHeader, replica_id="r1")
    with TestClient(app) as client:
        assert client.get("/plain").headers[REPLICA_HEADER] == "r1"
        with client.stream("GET", "/stream") as resp:
            assert resp.headers[REPLICA_HEADER] == "r1"
            assert resp.read().endswith(b"data: [DONE]\n\n")


def run_guarded(messages: list[dict]) -> list[dict]:
    """What ProxyResponseGuard sends when the proxy below it sends `messages` and returns."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        for message in messages:
            await send(message)

    async def send(message):
        sent.append(message)
    asyncio.run(ProxyResponseGuard(app)({"type": "http"}, None, send))
    return sent


def sse_start(content_type: bytes = b"text/event-stream; charset=utf-8", status: int = 200) -> dict:
    """A response start as a replica sends it (with its x-amusd-replica header)."""
    return {"type": "http.response.start", "status": status,
            "headers": [(b"content-type", content_type), (REPLICA_HEADER.encode(), b"r1")]}


def proxy_error(status: int, text: bytes) -> list[dict]:
    """An error response Serve's proxy makes itself (no replica header)."""
    return [{"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]},
            {"type": "http.response.body", "body": text, "more_body": False}]


def json_answer(sent: list[dict]) -> tuple[int, dict]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_stream_cut_by_a_dead_replica_ends_with_an_error_event_and_done():
    sent = run_guarded([sse_start(), {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}])
    assert sent[-1] == {"type": "http.response.body", "body": STREAM_END, "more_body": False}
    events = [line[len("data: "):] for line in STREAM_END.decode().split("\n\n") if line]
    assert json.loads(events[0]) == REPLICA_DIED and events[1] == "[DONE]"


def test_finished_streams_and_other_responses_are_left_alone():
    done = [sse_start(), {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}]
    assert run_guarded(done) == done
    cut_json = [sse_start(b"application/json"), {"type": "http.response.body", "body": b"{", "more_body": True}]
    assert run_guarded(cut_json) == cut_json
    own_error = [sse_start(b"application/json", status=500),            # the app's own 500 stays as it is
                 {"type": "http.response.body", "body": b'{"error": {}}', "more_body": False}]
    assert run_guarded(own_error) == own_error
    assert [m.cls for m in proxy_middlewares()] == [ProxyResponseGuard]


def test_request_without_any_response_gets_an_openai_503():
    """The replica died before answering: the proxy returns without a response (uvicorn's bare 500)."""
    assert json_answer(run_guarded([])) == (503, REPLICA_DIED)


def test_proxy_made_errors_become_openai_errors():
    status, body = json_answer(run_guarded(proxy_error(500, b"Internal Server Error")))
    assert status == 503 and body["error"]["code"] == "replica_died"
    status, body = json_answer(run_guarded(proxy_error(429, b"Request dropped due to backpressure")))
    assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
    assert body["error"]["message"] == "Request dropped due to backpressure"


# --- amusd serve-ray ---------------------------------------------------------------------------------------

def test_serve_ray_without_ray_says_how_to_install_it(monkeypatch, capsys):
    from server import ray_main
    monkeypatch.setitem(sys.modules, "ray", None)            # `import ray` raises ImportError
    assert ray_main.main(["--config", str(CONFIGS / "ray-tiny.yaml")]) == 1
    assert "pip install -e .[ray]" in capsys.readouterr().err


def test_serve_ray_bad_config_exits_2(tmp_path, capsys):
    from server import ray_main
    assert ray_main.main(["--config", write_config(tmp_path, max_ongoing_requests=0)]) == 2
    assert "max_ongoing_requests" in capsys.readouterr().err


def test_cli_dispatches_serve_ray_without_importing_ray():
    code = ("import sys; from engine.cli import main; rc = main(['serve-ray', '--help']); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "amusd serve-ray" in out.stdout and "NO_RAY 0" in out.stdout, out.stdout + out.stderr


# --- KubeRay manifest (not run: no Kubernetes here) ------------------------------------------------------

def test_rayservice_manifest_deploys_app_builder_with_a_valid_config():
    manifest = yaml.safe_load((REPO / "docker" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    [app] = serve_config["applications"]
    assert app["import_path"] == "server.ray_serve:app_builder"
    args = dict(app["args"])
    assert args.pop("config") == "/app/configs/ray.yaml"          # the image's WORKDIR is /app
    config = load_ray_config(str(CONFIGS / "ray.yaml"), **args)   # what app_builder does in the pod
    assert config.num_gpus == 2 and config.autoscaling.max_replicas == 4
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve is an optional extra")
    schema.ServeDeploySchema(**serve_config)
