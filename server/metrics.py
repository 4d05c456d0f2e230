"""Prometheus metrics: the only module that owns prometheus objects (one private registry per app).

Names follow vLLM's with the `amusd:` prefix; docker/prometheus/exported-metrics.txt lists them
for the Grafana dashboard. With `metrics_names: vllm` the metrics vLLM also has (VLLM_NAMES) are
exported under vLLM's own names (`vllm:` prefix) and every metric carries vLLM's `model_name`
label, so that vLLM dashboards and autoscalers work unchanged; AMUSD-only metrics keep `amusd:`.
Everything is fed from what the engine returns (EngineOutput.stats is a RequestStats) and from
`supervisor.health()` at scrape time; the engine never touches Prometheus.
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

# names (without prefix) that vLLM exports too, with the same meaning (vllm/v1/metrics/loggers.py)
VLLM_NAMES = frozenset({
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "num_requests_running", "num_requests_waiting", "prompt_tokens",
    "generation_tokens", "request_success", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens"})

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)
_LEAD_BUCKETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class _WorkerCollector(Collector):
    """worker_up / worker_restarts_total / forward costs / KV cache use, read from supervisor.health()
    at every scrape."""

    def __init__(self, health: Callable[[], dict], heartbeat_timeout_s: float, base_labels: dict[str, str]) -> None:
        self._health, self._timeout, self._base = health, heartbeat_timeout_s, base_labels

    def collect(self):
        names, values = list(self._base), list(self._base.values())
        up = GaugeMetricFamily("amusd:worker_up", "1 if the worker process is alive and heartbeating",
                               labels=[*names, "worker"])
        restarts = CounterMetricFamily("amusd:worker_restarts", "Worker process restarts",
                                       labels=[*names, "worker"])
        costs = GaugeMetricFamily("amusd:forward_cost_seconds", "Measured forward time for num_tokens tokens "
                                  "(the cost model's curve, engine/cost_model.py)",
                                  labels=[*names, "worker", "num_tokens"])
        kv_usage = GaugeMetricFamily("amusd:kv_cache_usage_perc", "Fraction of the KV cache budget reserved by "
                                     "running requests (prompt + max_tokens each; batching only)", labels=names)
        kv_budget = GaugeMetricFamily("amusd:kv_cache_budget_tokens", "Tokens of KV the running requests may "
                                      "reserve (kv_cache_memory_gb; batching only)", labels=names)
        try:
            health = self._health() or {}
        except Exception:   # a scrape must never fail because the engine is gone
            health = {}
        workers, kv_cache = health.get("workers", {}), health.get("kv_cache")
        if kv_cache and kv_cache.get("budget_tokens"):
            kv_budget.add_metric(values, float(kv_cache["budget_tokens"]))
            kv_usage.add_metric(values, kv_cache["reserved_tokens"] / kv_cache["budget_tokens"])
        for role in WORKERS:
            info = workers.get(role)
            if info is None:
                continue
            age = info.get("heartbeat_age_s")
            alive = bool(info.get("is_alive"))
            beating = age is not None and float(age) < self._timeout
            up.add_metric([*values, role], 1.0 if alive and beating else 0.0)
            restarts.add_metric([*values, role], float(info.get("num_restarts", 0) or 0))
            for num_tokens, seconds in enumerate(info.get("forward_costs_s") or [], start=1):
                costs.add_metric([*values, role, str(num_tokens)], float(seconds))
        yield up
        yield restarts
        yield costs
        yield kv_usage
        yield kv_budget


class ServerMetrics:
    def __init__(self, health: Callable[[], dict] | None = None, heartbeat_timeout_s: float = 60.0,
                 names: str = "amusd", model_name: str = "") -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.is_vllm_names = names == "vllm"
        self._base: dict[str, str] = {"model_name": model_name} if self.is_vllm_names else {}

        def make(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
            prefix = "vllm:" if self.is_vllm_names and name in VLLM_NAMES else "amusd:"
            return kind(prefix + name, doc, [*self._base, *labels], registry=r, **kw)

        self._ttft = make(Histogram, "time_to_first_token_seconds", "Time from arrival to first token",
                          buckets=_LATENCY_BUCKETS)
        self._itl = make(Histogram, "inter_token_latency_seconds",
                         "Time between successive engine outputs of a request (one verify step)",
                         buckets=_LATENCY_BUCKETS)
        self._e2e = make(Histogram, "e2e_request_latency_seconds", "Time from arrival to the last token",
                         buckets=_E2E_BUCKETS)
        self._queue_time = make(Histogram, "request_queue_time_seconds",
                                "Time a request waited before the engine started it", buckets=_E2E_BUCKETS)
        self._draft_lead = make(Histogram, "spec_decode_draft_lead_tokens",
                                "Mean draft lead (drafted minus committed tokens) per request",
                                buckets=_LEAD_BUCKETS)
        self._budget = make(Histogram, "spec_decode_budget_tokens",
                            "Mean tokens proposed per verify step in a request (the cost model's choice, "
                            "or the fixed setting)", buckets=_LEAD_BUCKETS)
        self._batch_size = make(Histogram, "batch_size", "Sequences in a verify forward pass, one observation "
                                "per pass (1 when requests run one at a time)", buckets=_BATCH_BUCKETS)
        self._running = make(Gauge, "num_requests_running", "Requests the engine is running")
        self._waiting = make(Gauge, "num_requests_waiting", "Requests waiting for the engine")
        self._prompt_tokens = make(Counter, "prompt_tokens", "Prefilled prompt tokens")
        self._generation_tokens = make(Counter, "generation_tokens", "Generated tokens")
        self._success = make(Counter, "request_success", "Finished requests by finish reason", ("finished_reason",))
        self._failure = make(Counter, "request_failure", "Requests that failed, by reason", ("reason",))
        self._num_drafts = make(Counter, "spec_decode_num_drafts", "Verify steps that checked at least one draft token")
        self._draft_tokens = make(Counter, "spec_decode_num_draft_tokens", "Draft tokens verified")
        self._accepted_tokens = make(Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self._draft_tokens_per_pos = make(Counter, "spec_decode_num_draft_tokens_per_pos",
                                          "Draft tokens verified, by position in the draft", ("position",))
        self._accepted_per_pos = make(Counter, "spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft", ("position",))
        self._rollbacks = make(Counter, "spec_decode_num_rollbacks", "Draft rollbacks")
        self._wasted_tokens = make(Counter, "spec_decode_num_draft_tokens_wasted",
                                   "Draft tokens computed but never accepted")
        self._wide_steps = make(Counter, "spec_decode_num_wide_steps",
                                "Batched verify steps the cost model ran as ar's, speculation not paying (async: on "
                                "both workers' cores, the draft paused; sync: the draft idle)")
        self._busy = make(Counter, "worker_busy_seconds", "Seconds a worker spent computing", ("worker",))
        if not self.is_vllm_names:
            self._create_children()
        if health is not None:
            r.register(_WorkerCollector(health, heartbeat_timeout_s, self._base))

    def set_model_name(self, model_name: str) -> None:
        """vLLM names: the `model_name` label (known once the engine has started)."""
        if self.is_vllm_names:
            self._base["model_name"] = model_name
            self._create_children()

    def _create_children(self) -> None:
        """Export every label combination from the start (at 0), as vLLM does."""
        for reason in FINISHED_REASONS:
            self._one(self._success, finished_reason=reason)
        for reason in FAILURE_REASONS:
            self._one(self._failure, reason=reason)
        for role in WORKERS:
            self._one(self._busy, worker=role)
        for metric in (self._ttft, self._itl, self._e2e, self._queue_time, self._draft_lead, self._budget,
                       self._batch_size, self._running, self._waiting, self._prompt_tokens, self._generation_tokens,
                       self._num_drafts, self._draft_tokens, self._accepted_tokens, self._rollbacks,
                       self._wasted_tokens):
            self._one(metric)

    def _one(self, metric, **labels):
        """The time series of `metric` for this server's base labels (+ `labels`)."""
        labels = {**self._base, **labels}
        return metric.labels(**labels) if labels else metric

    # ---- per-request events (called on the event loop) ---------------------------
    def observe_queue_time(self, seconds: float) -> None:
        self._one(self._queue_time).observe(max(0.0, seconds))

    def observe_first_token(self, seconds: float) -> None:
        self._one(self._ttft).observe(max(0.0, seconds))

    def observe_inter_token(self, seconds: float) -> None:
        self._one(self._itl).observe(max(0.0, seconds))

    def record_failure(self, reason: str) -> None:
        self._one(self._failure, reason=reason).inc()

    def record_finished(self, finish_reason: str, e2e_s: float, stats: RequestStats | None) -> None:
        """One request left the engine: 'stop' | 'length' | 'abort' count as success, 'error' fails."""
        if finish_reason == "error":
            self.record_failure("engine_error")
        else:
            self._one(self._success, finished_reason=finish_reason).inc()
            self._one(self._e2e).observe(max(0.0, e2e_s))
        if stats is None:
            return
        for metric, value in ((self._prompt_tokens, stats.num_prompt_tokens),
                              (self._generation_tokens, stats.num_generated_tokens),
                              (self._num_drafts, stats.num_drafts), (self._draft_tokens, stats.num_draft_tokens),
                              (self._accepted_tokens, stats.num_accepted_tokens),
                              (self._rollbacks, stats.num_rollbacks),
                              (self._wasted_tokens, stats.num_draft_tokens_wasted),
                              (self._wide_steps, stats.num_wide_steps)):
            self._one(metric).inc(max(0, value))
        for metric, counts in ((self._draft_tokens_per_pos, stats.num_draft_tokens_per_pos),
                               (self._accepted_per_pos, stats.num_accepted_tokens_per_pos)):
            for position, count in enumerate(counts):
                self._one(metric, position=str(position)).inc(max(0, count))
        batch_sizes = self._one(self._batch_size)
        for batch_size, num_passes in enumerate(stats.num_passes_by_batch_size, start=1):
            for _ in range(num_passes):             # prometheus histograms take one observation at a time
                batch_sizes.observe(batch_size)
        self._one(self._busy, worker="verify").inc(max(0.0, stats.verify_busy_s))
        self._one(self._busy, worker="draft").inc(max(0.0, stats.draft_busy_s))
        if stats.num_verify_steps > 0 and stats.num_draft_tokens > 0:
            self._one(self._draft_lead).observe(stats.sum_draft_lead / stats.num_verify_steps)
        if stats.num_verify_steps > 0:
            self._one(self._budget).observe(stats.num_proposed_tokens / stats.num_verify_steps)

    def set_queue_state(self, running: int, waiting: int) -> None:
        self._one(self._running).set(running)
        self._one(self._waiting).set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
