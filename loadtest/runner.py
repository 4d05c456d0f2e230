"""Schedules a load run: which prompt each request sends, when it starts, which ones hang up.

    outcome = run_load(LoadConfig(base_url="http://127.0.0.1:8000", num_requests=200,
                                  concurrency=32), prompts)

Requests start all at once (request_rate = inf) or at Poisson arrivals of `request_rate`
per second; at most `concurrency` are in flight. The whole run is bounded by `timeout_s`:
requests still running then are cancelled and reported as timed_out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from dataclasses import dataclass

import httpx

from loadtest.client import (STATUS_NOT_STARTED, STATUS_RUNNING, STATUS_TIMED_OUT, RequestOptions,
                             RequestPlan, RequestResult, fetch_model_name, send_request)
from loadtest.datasets import Prompt

FALLBACK_MODEL_NAME = "default"


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    options: RequestOptions = RequestOptions()   # options.model "" = ask GET /v1/models
    num_requests: int = 200
    concurrency: int = 32
    request_rate: float = math.inf               # requests/s (Poisson); inf = all at once
    disconnect_fraction: float = 0.0             # share of requests that hang up mid-stream
    timeout_s: float = 600.0                     # bound on the whole run
    read_timeout_s: float = 120.0                # silence on one stream that counts as dropped
    seed: int = 0
    is_shuffled: bool = True                     # False: prompts in dataset order (overhead mode)

    def validate(self) -> None:
        """Raise ValueError naming the setting that is out of range."""
        checks = [
            ("num_requests", self.num_requests >= 1, "must be >= 1"),
            ("concurrency", self.concurrency >= 1, "must be >= 1"),
            ("request_rate", self.request_rate > 0, "must be > 0 (inf = all at once)"),
            ("disconnect_fraction", 0.0 <= self.disconnect_fraction <= 1.0, "must be in [0, 1]"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("read_timeout_s", self.read_timeout_s > 0, "must be > 0"),
            ("max_tokens", self.options.max_tokens >= 1, "must be >= 1"),
            ("endpoint", self.options.endpoint in ("chat", "completions"), "must be chat or completions"),
        ]
        for name, is_ok, why in checks:
            if not is_ok:
                raise ValueError(f"{name} {why}")


@dataclass
class LoadOutcome:
    results: list[RequestResult]
    duration_s: float
    model: str


def make_plans(prompts: list[Prompt], config: LoadConfig) -> list[RequestPlan]:
    """Deterministic for a seed: prompt order, Poisson start times, who disconnects and when."""
    if not prompts:
        raise ValueError("no prompts to send")
    rng = random.Random(config.seed)
    order = list(range(len(prompts)))
    if config.is_shuffled:
        rng.shuffle(order)
    num_disconnects = round(config.disconnect_fraction * config.num_requests)
    disconnecting = set(rng.sample(range(config.num_requests), num_disconnects))
    max_disconnect_chunk = max(1, config.options.max_tokens // 2)
    plans, send_at_s = [], 0.0
    for index in range(config.num_requests):
        if index > 0 and math.isfinite(config.request_rate):
            send_at_s += rng.expovariate(config.request_rate)
        disconnect_after = rng.randint(1, max_disconnect_chunk) if index in disconnecting else None
        plans.append(RequestPlan(index=index, prompt=prompts[order[index % len(order)]],
                                 send_at_s=send_at_s, disconnect_after_chunks=disconnect_after))
    return plans


async def run_load_async(config: LoadConfig, prompts: list[Prompt]) -> LoadOutcome:
    config.validate()
    plans = make_plans(prompts, config)
    results = [RequestResult(index=plan.index, prompt=plan.prompt.text) for plan in plans]
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(connect=10.0, read=config.read_timeout_s, write=30.0, pool=None)
    # trust_env=False: never route through a proxy from the environment; talk to the target itself.
    async with httpx.AsyncClient(base_url=config.base_url, limits=limits, timeout=timeout,
                                 trust_env=False) as client:
        options = config.options
        if not options.model:
            model = await fetch_model_name(client) or FALLBACK_MODEL_NAME
            options = dataclasses.replace(options, model=model)
        in_flight = asyncio.Semaphore(config.concurrency)
        run_start = time.perf_counter()

        async def one_request(plan: RequestPlan) -> None:
            delay = plan.send_at_s - (time.perf_counter() - run_start)
            if delay > 0:
                await asyncio.sleep(delay)
            async with in_flight:
                await send_request(client, options, plan, results[plan.index], run_start)

        tasks = [asyncio.create_task(one_request(plan)) for plan in plans]
        _, pending = await asyncio.wait(tasks, timeout=config.timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration_s = time.perf_counter() - run_start
    for result in results:
        if result.status in (STATUS_NOT_STARTED, STATUS_RUNNING):
            result.status, result.error = STATUS_TIMED_OUT, f"--timeout-s {config.timeout_s:g} ran out"
    return LoadOutcome(results=results, duration_s=duration_s, model=options.model)


def run_load(config: LoadConfig, prompts: list[Prompt]) -> LoadOutcome:
    return asyncio.run(run_load_async(config, prompts))
