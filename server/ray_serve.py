"""Ray Serve deployment of the server: replicas of one whole engine behind Ray Serve's HTTP proxy.

    amusd serve-ray --config configs/ray.yaml                      # server/ray_main.py
    serve run server.ray_serve:app_builder config=configs/ray.yaml  # Ray's own CLI / KubeRay RayService

    client ─HTTP/SSE─▶ Ray Serve HTTP proxy (one per node)
                        │ request router: power of two choices (Ray Serve's default, set explicitly
                        │ here): two random replicas are asked for their queue length, the shorter
                        │ wins; at most max_ongoing_requests per replica, the rest wait at the proxy
                        ▼
             AmusdReplica (a Ray actor; num_gpus: 2 or num_cpus)  × min..max (autoscaled on ongoing
               the FastAPI app of server/app.py                     requests per replica)
               EngineSupervisor ─▶ draft worker, verify worker (processes, on the replica's devices)

Every replica serves the app that `create_app` builds (the same routes, SSE included), with
`x-amusd-replica` on every response and `replica` in /health. Ray calls `check_health`, which maps
to the engine's health (server/replica.py): an engine beyond self-healing makes Ray replace the
replica. Metrics: each replica copies its own Prometheus registry into Ray's metrics
(`ray.serve.metrics.Gauge`, tagged with `replica`, `deployment`, `application`) every
`metrics_push_interval_s`; Ray's metrics agent on each node exports them (as `ray_amusd_...`;
docker/prometheus/prometheus.yml renames them back to `amusd:...`). A replica killed mid-stream
takes its connections with it: Serve's proxy ends such a stream with an error event and [DONE]
(server/ray_proxy.py, where installed; otherwise the client sees the body cut short) or answers
503 if nothing was sent yet, and routes new requests to the survivors while Ray starts a replacement.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray
from ray import serve
from ray.serve.metrics import Gauge

from server.app import create_app
from server.ray_config import RayServeConfig, load_ray_config
from server.ray_proxy import CALLBACK_ENV, CALLBACK_PATH
from server.replica import EngineHealthCheck, ReplicaHeader, place_on_devices
from server.settings import Settings

logger = logging.getLogger("amusd.ray")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POWER_OF_TWO_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"


def ray_metric_name(name: str) -> str:
    """'amusd:generation_tokens_total' -> 'amusd_generation_tokens_total' (Ray metric names have no ':';
    Ray exports it as 'ray_amusd_generation_tokens_total', which Prometheus relabels back)."""
    return name.replace(":", "_")


class RayMetricsBridge:
    """Copies a prometheus_client registry into Ray metrics every `interval_s` (a daemon thread).

    Every sample becomes a Ray gauge of the same name and labels (counters keep their cumulative
    value, histograms their `_bucket{le}` / `_sum` / `_count` series), so rate() and
    histogram_quantile() work on them as on the single server's /metrics. Ray Serve adds the
    `replica` label.
    """

    def __init__(self, registry: Any, interval_s: float) -> None:
        self.registry, self.interval_s = registry, interval_s
        self._gauges: dict[str, Gauge] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="amusd-ray-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def push_once(self) -> int:
        """Copy every sample once; returns how many were copied."""
        num_samples = 0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(ray_metric_name(sample.name), description=family.documentation or sample.name,
                                  tag_keys=tuple(sorted(sample.labels)))
                    self._gauges[sample.name] = gauge
                gauge.set(float(sample.value), tags=dict(sample.labels) or None)
                num_samples += 1
        return num_samples

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push_once()
            except Exception as exc:      # metrics must never take the replica down
                logger.warning("copying metrics to Ray failed: %s", exc)


@serve.deployment
@serve.ingress()
class AmusdReplica:
    """One replica = one engine (supervisor + workers) serving the FastAPI app of server/app.py."""

    def __init__(self, settings: dict, unhealthy_after_s: float, metrics_push_interval_s: float) -> None:
        self.replica_id = serve.get_replica_context().replica_tag
        gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        self.settings = place_on_devices(Settings.model_validate(settings), gpu_ids)
        identity = {"id": self.replica_id, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                    "gpu_ids": gpu_ids}
        logging.basicConfig(level=self.settings.log_level.upper())
        logger.info("replica %s: draft on %s, verify on %s", self.replica_id, self.settings.draft_device,
                    self.settings.verify_device)
        self.asgi_app = create_app(self.settings, replica=identity)    # the lifespan starts the engine
        self.asgi_app.add_middleware(ReplicaHeader, replica_id=self.replica_id)
        self.health_check = EngineHealthCheck(unhealthy_after_s)
        self.metrics_bridge = RayMetricsBridge(self.asgi_app.state.amusd["metrics"].registry, metrics_push_interval_s)
        self.metrics_bridge.start()

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi_app

    async def check_health(self) -> None:
        self.health_check.check(self.asgi_app.state.amusd)

    def __del__(self) -> None:
        self.metrics_bridge.stop()    # the engine is stopped by the app's lifespan (Ray runs it)


def build_app(config: RayServeConfig) -> Any:
    """The Serve application: AmusdReplica with the config's resources, routing and autoscaling."""
    settings = config.engine_settings()
    deployment = AmusdReplica.options(
        name=config.deployment_name,
        ray_actor_options=config.ray_actor_options(PROJECT_ROOT),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config={"status_code": 429},
        autoscaling_config=config.autoscaling_config(),
        request_router_config={"request_router_class": POWER_OF_TWO_ROUTER},
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
    )
    return deployment.bind(settings.model_dump(mode="json"), config.unhealthy_after_s,
                           config.metrics_push_interval_s)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run server.ray_serve:app_builder config=PATH` and a RayService's import_path;
    other args override top-level keys of the config (e.g. num_gpus: 2)."""
    args = dict(args)
    path = args.pop("config", os.path.join(PROJECT_ROOT, "configs", "ray.yaml"))
    return build_app(load_ray_config(path, **args))


def local_cluster_env() -> dict[str, str]:
    """Environment for a Ray node started from here (`ray.init()` of a local cluster): its
    processes import this checkout, and Serve's proxy ends cut streams (server/ray_proxy.py)."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": PROJECT_ROOT + (os.pathsep + path if path else ""),
            CALLBACK_ENV: os.environ.get(CALLBACK_ENV, CALLBACK_PATH)}


def deploy(config: RayServeConfig) -> None:
    """Start Serve's HTTP proxy on the connected cluster and deploy (returns once replicas are up)."""
    serve.start(http_options={"host": config.http_host, "port": config.http_port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
