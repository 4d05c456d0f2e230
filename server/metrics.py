"""Prometheus metrics: the only module that owns prometheus objects (one private registry per app).

Names follow vLLM's with the `amusd:` prefix; docker/prometheus/exported-metrics.txt lists them
for the Grafana dashboard. Everything is fed from what the engine returns (EngineOutput.stats is a
RequestStats) and from `supervisor.health()` at scrape time; the engine never touches Prometheus.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.messages import RequestStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKERS = ("verify", "draft")
FINISHED_REASONS = ("stop", "length", "abort")
FAILURE_REASONS = ("invalid_request", "unauthorized", "queue_full", "queue_timeout", "not_ready",
                   "engine_error", "internal_error")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)
_LEAD_BUCKETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0)


class _WorkerCollector(Collector):
    """worker_up / worker_restarts_total, read from supervisor.health() at every scrape."""

    def __init__(self, health: Callable[[], dict], heartbeat_timeout_s: float) -> None:
        self._health, self._timeout = health, heartbeat_timeout_s

    def collect(self):
        up = GaugeMetricFamily("amusd:worker_up", "1 if the worker process is alive and heartbeating",
                               labels=["worker"])
        restarts = CounterMetricFamily("amusd:worker_restarts", "Worker process restarts",
                                       labels=["worker"])
        costs = GaugeMetricFamily("amusd:forward_cost_seconds", "Measured forward time for num_tokens tokens "
                                  "(the cost model's curve, engine/cost_model.py)", labels=["worker", "num_tokens"])
        try:
            workers = (self._health() or {}).get("workers", {})
        except Exception:   # a scrape must never fail because the engine is gone
            workers = {}
        for role in WORKERS:
            info = workers.get(role)
            if info is None:
                continue
            age = info.get("heartbeat_age_s")
            alive = bool(info.get("is_alive"))
            beating = age is not None and float(age) < self._timeout
            up.add_metric([role], 1.0 if alive and beating else 0.0)
            restarts.add_metric([role], float(info.get("num_restarts", 0) or 0))
            for num_tokens, seconds in enumerate(info.get("forward_costs_s") or [], start=1):
                costs.add_metric([role, str(num_tokens)], float(seconds))
        yield up
        yield restarts
        yield costs


class ServerMetrics:
    def __init__(self, health: Callable[[], dict] | None = None, heartbeat_timeout_s: float = 60.0) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("amusd:time_to_first_token_seconds", "Time from arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("amusd:inter_token_latency_seconds",
                             "Time between successive engine outputs of a request (one verify step)",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("amusd:e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("amusd:request_queue_time_seconds",
                                    "Time a request waited before the engine started it",
                                    buckets=_E2E_BUCKETS, registry=r)
        self.draft_lead = Histogram("amusd:spec_decode_draft_lead_tokens",
                                    "Mean draft lead (drafted minus committed tokens) per request",
                                    buckets=_LEAD_BUCKETS, registry=r)
        self.budget = Histogram("amusd:spec_decode_budget_tokens",
                                "Mean tokens proposed per verify step in a request (the cost model's choice, "
                                "or the fixed setting)", buckets=_LEAD_BUCKETS, registry=r)
        self.running = Gauge("amusd:num_requests_running", "Requests the engine is running", registry=r)
        self.waiting = Gauge("amusd:num_requests_waiting", "Requests waiting for the engine", registry=r)
        self.prompt_tokens = Counter("amusd:prompt_tokens", "Prefilled prompt tokens", registry=r)
        self.generation_tokens = Counter("amusd:generation_tokens", "Generated tokens", registry=r)
        self.success = Counter("amusd:request_success", "Finished requests by finish reason",
                               ["finished_reason"], registry=r)
        self.failure = Counter("amusd:request_failure", "Requests that failed, by reason",
                               ["reason"], registry=r)
        self.num_drafts = Counter("amusd:spec_decode_num_drafts",
                                  "Verify steps that checked at least one draft token", registry=r)
        self.draft_tokens = Counter("amusd:spec_decode_num_draft_tokens", "Draft tokens verified",
                                    registry=r)
        self.accepted_tokens = Counter("amusd:spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                       registry=r)
        self.rollbacks = Counter("amusd:spec_decode_num_rollbacks", "Draft rollbacks", registry=r)
        self.wasted_tokens = Counter("amusd:spec_decode_num_draft_tokens_wasted",
                                     "Draft tokens computed but never accepted", registry=r)
        self.busy = Counter("amusd:worker_busy_seconds", "Seconds a worker spent computing",
                            ["worker"], registry=r)
        for reason in FINISHED_REASONS:
            self.success.labels(finished_reason=reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(reason=reason)
        for role in WORKERS:
            self.busy.labels(worker=role)
        if health is not None:
            r.register(_WorkerCollector(health, heartbeat_timeout_s))

    # ---- per-request events (called on the event loop) ---------------------------
    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(max(0.0, seconds))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(max(0.0, seconds))

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(max(0.0, seconds))

    def record_failure(self, reason: str) -> None:
        self.failure.labels(reason=reason).inc()

    def record_finished(self, finish_reason: str, e2e_s: float, stats: RequestStats | None) -> None:
        """One request left the engine: 'stop' | 'length' | 'abort' count as success, 'error' fails."""
        if finish_reason == "error":
            self.record_failure("engine_error")
        else:
            self.success.labels(finished_reason=finish_reason).inc()
            self.e2e.observe(max(0.0, e2e_s))
        if stats is None:
            return
        self.prompt_tokens.inc(max(0, stats.num_prompt_tokens))
        self.generation_tokens.inc(max(0, stats.num_generated_tokens))
        self.num_drafts.inc(max(0, stats.num_drafts))
        self.draft_tokens.inc(max(0, stats.num_draft_tokens))
        self.accepted_tokens.inc(max(0, stats.num_accepted_tokens))
        self.rollbacks.inc(max(0, stats.num_rollbacks))
        self.wasted_tokens.inc(max(0, stats.num_draft_tokens_wasted))
        self.busy.labels(worker="verify").inc(max(0.0, stats.verify_busy_s))
        self.busy.labels(worker="draft").inc(max(0.0, stats.draft_busy_s))
        if stats.num_verify_steps > 0 and stats.num_draft_tokens > 0:
            self.draft_lead.observe(stats.sum_draft_lead / stats.num_verify_steps)
        if stats.num_verify_steps > 0:
            self.budget.observe(stats.num_proposed_tokens / stats.num_verify_steps)

    def set_queue_state(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
