"""The server as Ray Serve replicas on a local Ray cluster (CPU, tiny random models).

One module-scoped cluster: `ray.init(num_cpus=4)` (logical CPUs: one per replica, room for the
proxy and the controller) and configs/ray-tiny.yaml: two replicas, each a whole engine (supervisor
+ draft and verify workers, mode async), behind Serve's HTTP proxy on a free port. The tests run
in file order and share it: spread of 16 streams, per-replica metrics, kill -9 of a verify worker,
kill -9 of a replica actor, then autoscaling down and up.

    .venv/bin/python -m pytest -q -p no:cacheprovider -m ray tests/test_ray_serve.py
"""
from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -e .[ray]")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from server import ray_serve  # noqa: E402
from server.ray_config import load_ray_config  # noqa: E402
from server.replica import REPLICA_HEADER  # noqa: E402
from tests.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.ray,   # autoscaling_config.metrics_interval_s: deprecated, still the one knob
              pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")]
TINY_RAY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ray-tiny.yaml"
STREAM_TIMEOUT_S = 60.0      # a stream silent this long counts as hung
LONG_STREAM_TOKENS = 400     # ~1-2 s of tiny-model decoding: still running when the kill comes


@dataclass
class Stream:
    """One streaming completion, read in a thread: what the client saw."""
    replica: str | None = None
    status: int | None = None
    events: list = field(default_factory=list)     # parsed `data:` payloads; "[DONE]" as is
    transport_error: str | None = None
    is_hung: bool = False
    has_tokens: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def error_events(self) -> list:
        return [e for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.events[-1:] == ["[DONE]"] and not self.error_events

    @property
    def ended_with_error_event(self) -> bool:
        return self.events[-1:] == ["[DONE]"] and bool(self.error_events)


def read_stream(base_url: str, stream: Stream, max_tokens: int) -> None:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    try:
        with httpx.stream("POST", base_url + "/v1/completions", json=body,
                          timeout=httpx.Timeout(STREAM_TIMEOUT_S, connect=10)) as resp:
            stream.status, stream.replica = resp.status_code, resp.headers.get(REPLICA_HEADER)
            if resp.status_code != 200:
                stream.events.append(json.loads(resp.read()))    # always an OpenAI error body
                return
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    stream.events.append(payload if payload == "[DONE]" else json.loads(payload))
                    stream.has_tokens.set()
    except httpx.ReadTimeout as exc:
        stream.is_hung, stream.transport_error = True, repr(exc)
    except (httpx.HTTPError, ValueError) as exc:    # a cut connection, a body that is not JSON
        stream.transport_error = repr(exc)
    finally:
        stream.has_tokens.set()
        stream.done.set()


def start_streams(base_url: str, num_streams: int, max_tokens: int) -> list[Stream]:
    streams = [Stream() for _ in range(num_streams)]
    for stream in streams:
        threading.Thread(target=read_stream, args=(base_url, stream, max_tokens), daemon=True).start()
    return streams


def wait_all(streams: list[Stream], timeout_s: float = 150.0) -> None:
    deadline = time.monotonic() + timeout_s
    for stream in streams:
        assert stream.done.wait(max(0.0, deadline - time.monotonic())), "a stream hung"
        assert not stream.is_hung, f"a stream hung: {stream.transport_error}"


def num_running_replicas(config) -> int:
    app = serve.status().applications.get(config.app_name)
    if app is None or config.deployment_name not in app.deployments:
        return 0
    return app.deployments[config.deployment_name].replica_states.get("RUNNING", 0)


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def poll_health(base_url: str, until, timeout_s: float, what: str) -> dict[str, dict]:
    """Poll /health (the router picks a replica per call) until `until(seen)`; seen: the latest
    200 body of each replica, by replica id."""
    seen: dict[str, dict] = {}

    def poll():
        try:
            resp = httpx.get(base_url + "/health", timeout=5)
        except httpx.HTTPError:
            return None
        if resp.status_code == 200:
            seen[resp.headers[REPLICA_HEADER]] = resp.json()
        return until(seen)
    wait_until(poll, timeout_s, what, poll_s=0.05)
    return seen


def replicas_health(base_url: str, num_replicas: int, timeout_s: float = 60.0) -> dict[str, dict]:
    return poll_health(base_url, lambda seen: len(seen) >= num_replicas, timeout_s,
                       f"{num_replicas} healthy replicas on /health")


@pytest.fixture(scope="module")
def cluster(session_cache_dir):
    """A local Ray cluster running configs/ray-tiny.yaml (two replicas)."""
    metrics_port = free_port()
    saved_env = dict(os.environ)
    os.environ.update(ray_serve.local_cluster_env())   # before ray.init: the raylet passes it on
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False)
    config = load_ray_config(str(TINY_RAY_CONFIG), http_port=free_port())
    try:
        ray_serve.deploy(config)
        yield config, f"http://127.0.0.1:{config.http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


def test_sixteen_streams_spread_over_both_replicas(cluster):
    config, base_url, _ = cluster
    assert num_running_replicas(config) == 2
    streams = start_streams(base_url, 16, max_tokens=16)
    wait_all(streams)
    assert all(s.completed for s in streams), [(s.status, s.events[-2:], s.transport_error) for s in streams]
    per_replica = collections.Counter(s.replica for s in streams)
    print(f"\nstreams per replica: {dict(per_replica)}")
    assert len(per_replica) == 2 and None not in per_replica, per_replica
    assert max(per_replica.values()) <= config.max_ongoing_requests, per_replica


def test_each_replica_exports_its_metrics_labelled_by_replica(cluster):
    """Ray's metrics agent exports every replica's amusd metrics with a `replica` label."""
    _, base_url, metrics_url = cluster
    replica_ids = set(replicas_health(base_url, 2))

    def successes_by_replica() -> dict[str, float] | None:
        found: dict[str, float] = {}
        for line in httpx.get(metrics_url, timeout=10).text.splitlines():
            if line.startswith("ray_amusd_request_success_total{") and 'finished_reason="length"' in line:
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                found[replica] = float(line.rsplit(" ", 1)[1])
        return found if replica_ids <= set(found) and all(found[r] > 0 for r in replica_ids) else None
    found = wait_until(successes_by_replica, 30, "per-replica ray_amusd_request_success_total")
    print(f"\nray_amusd_request_success_total by replica: {found}")


def streams_under_way(base_url: str) -> tuple[dict, list, str]:
    """Both replicas' health, four long streams, and the replica serving the first (once it streams)."""
    health = replicas_health(base_url, 2)
    streams = start_streams(base_url, 4, max_tokens=LONG_STREAM_TOKENS)
    assert streams[0].has_tokens.wait(STREAM_TIMEOUT_S)
    return health, streams, streams[0].replica


def test_kill_verify_worker_mid_stream_loses_nothing_and_the_engine_heals(cluster):
    _, base_url, _ = cluster
    health, streams, victim = streams_under_way(base_url)
    old_verify_pid = health[victim]["workers"]["verify"]["pid"]
    os.kill(old_verify_pid, signal.SIGKILL)
    wait_all(streams)
    assert streams[0].ended_with_error_event, streams[0].events[-2:]   # it was mid-stream
    on_victim = [s for s in streams if s.replica == victim]
    assert all(s.completed or s.ended_with_error_event for s in on_victim), \
        [(s.events[-2:], s.transport_error) for s in on_victim]
    assert any(s.ended_with_error_event for s in on_victim), "the running stream should end with an error"
    assert all(s.completed for s in streams if s.replica != victim)
    # the replica's supervisor restarted the worker: same replica, new verify pid, healthy again
    def verify_pid(seen: dict) -> int | None:
        return seen.get(victim, {}).get("workers", {}).get("verify", {}).get("pid")
    healed = poll_health(base_url, lambda seen: verify_pid(seen) not in (None, old_verify_pid), 90,
                         "the verify worker's restart")
    assert healed[victim]["status"] == "ok"
    again = start_streams(base_url, 4, max_tokens=8)
    wait_all(again)
    assert all(s.completed for s in again)


def test_kill_replica_actor_mid_stream_loses_nothing_and_ray_replaces_it(cluster):
    config, base_url, _ = cluster
    health, streams, victim = streams_under_way(base_url)
    os.kill(health[victim]["replica"]["pid"], signal.SIGKILL)
    wait_all(streams)
    # the victim's requests: ended by Serve's proxy through server/ray_proxy.py, never cut or a bare
    # 500: an error event + [DONE] mid-stream, or a 503 (no replica header) for those not started
    on_victim = [s for s in streams if s.replica in (victim, None)]
    print(f"\nrequests on the killed replica: {[(s.status, len(s.events), s.events[-2:]) for s in on_victim]}")
    for s in on_victim:
        assert s.transport_error is None, s.transport_error
        assert s.completed or s.ended_with_error_event or (s.status == 503 and s.events[0]["error"]["code"]
                                                           == "replica_died"), (s.status, s.events[-2:])
    assert streams[0].ended_with_error_event, "the victim's first stream was mid-stream"
    assert streams[0].error_events[-1]["error"]["code"] == "replica_died"
    assert all(s.completed for s in streams if s not in on_victim)
    # new requests, once Ray knows the replica is gone, go to the survivor while Ray replaces it
    wait_until(lambda: num_running_replicas(config) < 2, 30, "Ray to notice the dead replica", poll_s=0.05)
    fresh = start_streams(base_url, 4, max_tokens=8)
    wait_all(fresh)
    assert all(s.completed and s.replica != victim for s in fresh), \
        [(s.replica, s.status, s.events[-1:], s.transport_error) for s in fresh]
    ids = set(replicas_health(base_url, 2, timeout_s=120))
    assert victim not in ids and len(ids) == 2
    assert num_running_replicas(config) == 2


def test_engine_that_cannot_heal_fails_the_health_check_and_ray_replaces_the_replica(cluster, session_cache_dir):
    """The verify model breaks on disk, then its worker is killed: the supervisor's restarts fail
    (max_restarts), the engine gives up, check_health raises, and Ray starts a new replica."""
    config, base_url, _ = cluster
    wait_until(lambda: num_running_replicas(config) == 2, 120, "two running replicas to start with")
    victim, health = next(iter(replicas_health(base_url, 2).items()))
    from engine.tiny_models import ensure_tiny_model
    model_config = Path(ensure_tiny_model("tiny-random/verify", session_cache_dir)) / "config.json"   # not -padded
    original = model_config.read_bytes()
    model_config.write_text("{ not json")

    last_seen: dict = {}

    def engine_failed() -> bool:
        try:
            resp = httpx.get(base_url + "/health", timeout=5)
        except httpx.HTTPError:
            return False
        if resp.headers.get(REPLICA_HEADER) == victim:
            last_seen.update(status=resp.status_code, body=resp.json())
            if resp.json().get("fatal_error"):
                return True
        return num_running_replicas(config) < 2      # Ray already took it out
    try:
        os.kill(health["workers"]["verify"]["pid"], signal.SIGKILL)
        try:
            wait_until(engine_failed, 180, "the engine to give up", poll_s=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the victim's last /health: {last_seen}; {serve.status()}") from None
    finally:
        model_config.write_bytes(original)            # so that the replacement can start
    ids = set(poll_health(base_url, lambda seen: len(set(seen) - {victim}) >= 2, 120, "a replacement replica"))
    assert victim not in ids
    wait_until(lambda: num_running_replicas(config) == 2, 60, "two running replicas")


def test_autoscaling_scales_down_when_idle_and_up_under_load(cluster):
    config, base_url, _ = cluster
    quick = config.model_copy(update={"autoscaling": config.autoscaling.model_copy(update={"downscale_delay_s": 1.0})})
    serve.run(ray_serve.build_app(quick), name=config.app_name, route_prefix=config.route_prefix)  # config-only update
    wait_until(lambda: num_running_replicas(config) == 1, 90, "scale-down to min_replicas when idle")
    assert len(replicas_health(base_url, 1)) == 1
    is_loaded, finished = threading.Event(), []

    def keep_busy() -> None:      # 12 streams at a time on one replica: 8 ongoing there, 4 at the proxy
        while not is_loaded.is_set():
            batch = start_streams(base_url, 12, max_tokens=LONG_STREAM_TOKENS)
            wait_all(batch)
            finished.extend(batch)
    load = threading.Thread(target=keep_busy, daemon=True)
    load.start()
    try:
        wait_until(lambda: num_running_replicas(config) == 2, 120, "scale-up under load")
    finally:
        is_loaded.set()
        load.join(150)
    assert finished and all(s.completed for s in finished), \
        [(s.status, s.events[-1:], s.transport_error) for s in finished if not s.completed]
