"""`amusd serve-ray` configuration: how many engine replicas Ray Serve runs, and each one's settings.

    config = load_ray_config("configs/ray.yaml")     # RayServeConfig; raises RayConfigError
    config.engine_settings()                         # server.settings.Settings of every replica

One YAML file (configs/ray.yaml): the Ray keys below, `settings_file` (an `amusd serve` settings
file, relative to this one) and `settings` (overrides of it, same keys as `amusd serve --help`).
This module does not import ray: the CLI checks a config (and reports a missing Ray) without it.

Queueing: Ray Serve's proxy sends a replica at most `max_ongoing_requests` requests at a time; the
replica's engine runs one and keeps the others in its own FIFO, so `max_queue_size` must hold
`max_ongoing_requests - 1` (checked here). Beyond that, requests wait at the proxy
(`max_queued_requests`, then 429).
"""
from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.config import ConfigError
from server.settings import Settings, load_settings


class RayConfigError(ValueError):
    """The Ray config (or the engine settings it names) is invalid; the message says why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Strict):
    """Ray Serve's request-based autoscaler (AutoscalingConfig): replicas follow ongoing requests."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start (none = min_replicas)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="ongoing (running + queued) requests "
                                           "per replica the autoscaler aims at")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="window the ongoing requests are averaged over")
    metrics_interval_s: float | None = Field(None, gt=0, description="how often replicas report their ongoing "
                                             "requests (none = Ray's default, 10 s; keep it below look_back_period_s)")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        start = self.initial_replicas
        if start is not None and not self.min_replicas <= start <= self.max_replicas:
            raise ValueError(f"initial_replicas ({start}) outside [min_replicas, max_replicas]")
        return self


class RayServeConfig(_Strict):
    # ---- cluster and HTTP proxy ----------------------------------------------------
    address: str | None = Field(None, description="Ray cluster: none = start a local one (or join "
                                "RAY_ADDRESS), 'auto' = the cluster running on this host, or ray://host:10001")
    http_host: str = Field("127.0.0.1", description="where Ray Serve's HTTP proxy listens (0.0.0.0 for all)")
    http_port: int = Field(8000, ge=1, le=65535)
    app_name: str = "amusd"
    deployment_name: str = "amusd"
    route_prefix: str = "/"
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the replicas "
                                        "(none: PYTHONPATH = this checkout, so replicas import the same code)")
    # ---- one replica = one engine (supervisor + draft and verify workers) -------------
    num_cpus: float = Field(2.0, ge=0, description="CPUs a replica reserves (its two workers)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs a replica reserves: 2 = draft on the first, "
                            "verify on the second (CUDA_VISIBLE_DEVICES as Ray assigned them)")
    max_ongoing_requests: int = Field(4, ge=1, description="requests the proxy sends one replica at once "
                                      "(running + in its engine FIFO)")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting at each proxy for a replica; "
                                     "more get 429 (-1 = no limit)")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    unhealthy_after_s: float = Field(600.0, gt=0, description="an engine not ready this long (a worker that "
                                     "keeps failing to restart) is reported unhealthy; a failed engine at once")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    metrics_push_interval_s: float = Field(5.0, gt=0, description="how often a replica copies its Prometheus "
                                           "metrics to Ray's metrics agent (labelled by replica)")
    # ---- engine settings -------------------------------------------------------------
    settings_file: str | None = Field(None, description="`amusd serve` settings file, relative to this one")
    settings: dict[str, Any] = Field(default_factory=dict, description="overrides of settings_file")

    def engine_settings(self) -> Settings:
        """The Settings every replica runs (env vars AMUSD_* apply as for `amusd serve`)."""
        if self.settings_file and not os.path.isfile(self.settings_file):
            raise RayConfigError(f"settings_file not found: {self.settings_file}")
        try:
            settings = load_settings(["--config", self.settings_file] if self.settings_file else [],
                                     **self.settings)
            settings.to_engine_config()
        except (ValidationError, ConfigError, ValueError) as exc:
            raise RayConfigError(f"invalid engine settings: {exc}") from None
        if settings.max_queue_size < self.max_ongoing_requests - 1:
            raise RayConfigError(
                f"settings.max_queue_size ({settings.max_queue_size}) must be at least max_ongoing_requests - 1 "
                f"({self.max_ongoing_requests - 1}): the proxy sends a replica that many requests at once")
        return settings

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve's `autoscaling_config` (queue-length metric: ongoing requests per replica)."""
        return self.autoscaling.model_dump(exclude_none=True)

    def ray_actor_options(self, project_root: str) -> dict[str, Any]:
        runtime_env = self.runtime_env or {"env_vars": {"PYTHONPATH": project_root}}
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "runtime_env": runtime_env}


def load_ray_config(path: str, **overrides: Any) -> RayServeConfig:
    """Read and check a Ray config file; `overrides` replace top-level keys. Raises RayConfigError."""
    if not os.path.isfile(path):
        raise RayConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise RayConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RayConfigError(f"{path}: expected a mapping of settings")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if raw.get("settings_file"):
        raw["settings_file"] = os.path.join(os.path.dirname(os.path.abspath(path)), raw["settings_file"])
    try:
        config = RayServeConfig(**raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}" for e in exc.errors()]
        raise RayConfigError(f"{path}: invalid Ray settings:\n" + "\n".join(lines)) from None
    config.engine_settings()   # fail here, not in every replica
    return config
