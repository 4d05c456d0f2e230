"""`mode: auto`'s measurements: each worker's forward cost as every mode would meet it.

Start-up costs are measured one worker at a time, but async runs both workers at once, and on
one CPU they share a memory system that a second core widens only ~1.2x (measured on an
AVX512_BF16 EPYC: 24.6 GB/s on one core, 29.8 on two), while ar and sync run in one worker on both
workers' cores. So, with both workers of an async start up and idle (supervisor thread, torch-free):

    1. "together"  both workers get Measure at once; the verify times c(1..K) while the draft repeats
                   one-token forwards; when the verify answers, the draft gets MeasureStop and answers
                   with its median c(1) under that load
    2. "wide"      the verify alone on ar's cores, then the draft alone on the same cores

~10 s on the default pair's first start; the result is cached in <cache_dir>/costs/mode-<hash>.json,
keyed by what both workers' start-up costs depended on (their `costs_id`s) and the cores, unless the
verify ran slower on all cores than alone on its own twice in a row (something else was running: used
now, marked `is_disturbed`, and neither they nor the mode chosen from them are kept).

The decision itself is kept too, unless its costs were disturbed (costs/mode-decision-<hash of the
configuration>.json, with the verify worker's `costs_id` in the chosen mode): a later start with the
same configuration starts in that mode directly instead of starting async, measuring and restarting;
if the verify's costs_id differs then (other kernels, model files, CPU or torch), it decides again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

from engine.config import EngineConfig
from engine.cost_model import MIN_GUARDED_S, ForwardCosts, ModeCosts
from engine.messages import Measure, Measured, MeasureStop, WorkerFailed
from engine.worker_handle import WorkerHandle

logger = logging.getLogger("amusd.engine")
FORMAT_VERSION = 3             # of cached costs and decisions: bump when the cost model or a default changes
MAX_WIDE_SLOWDOWN = 1.25      # more cores never make a forward this much slower unless something else ran


class MeasureError(RuntimeError):
    """A worker failed or did not answer while measuring."""


def measure_mode_costs(workers: dict[str, WorkerHandle], config: EngineConfig, receive) -> ModeCosts:
    """ModeCosts for `choose_mode` from an idle async pair (`receive(timeout_s)`: the next worker message)."""
    verify, draft = (ForwardCosts(tuple(workers[role].ready.runtime["forward_costs_s"]))
                     for role in ("verify", "draft"))
    path = _cache_path(workers, config)
    try:
        with open(path) as f:
            cached = json.load(f)["seconds"]
        return _mode_costs(verify, draft, cached)
    except (OSError, ValueError, KeyError):
        pass
    logger.info("mode auto: measuring each worker while the other runs, then each alone on all cores (once)")
    measured: dict[str, list[float]] = {}          # "<role>_<placement>": c(1..K), as they arrive
    for role in ("verify", "draft"):
        workers[role].cmd_queue.put(Measure("together"))
    _await(workers, "verify_together", measured, receive, config.step_timeout_s)
    workers["draft"].cmd_queue.put(MeasureStop())
    _await(workers, "draft_together", measured, receive, config.step_timeout_s)
    for role in ("verify", "draft"):
        workers[role].cmd_queue.put(Measure("wide"))
        _await(workers, f"{role}_wide", measured, receive, config.step_timeout_s)
    if _looks_disturbed(verify, measured):          # a passing blip? measure once more, keep the faster
        first = measured.pop("verify_wide")
        workers["verify"].cmd_queue.put(Measure("wide"))
        _await(workers, "verify_wide", measured, receive, config.step_timeout_s)
        measured["verify_wide"] = [min(a, b) for a, b in zip(first, measured["verify_wide"])]
    if _looks_disturbed(verify, measured):
        logger.warning("mode auto: the verify measured slower on all cores (%.1f ms) than alone on its own "
                       "(%.1f ms): something else was running; these costs are used now but not cached",
                       measured["verify_wide"][0] * 1e3, verify.cost(1) * 1e3)
        return dataclasses.replace(_mode_costs(verify, draft, measured), is_disturbed=True)
    _write_json(path, {"seconds": measured})
    return _mode_costs(verify, draft, measured)


def _looks_disturbed(verify: ForwardCosts, measured: dict[str, list[float]]) -> bool:
    """The verify ran slower on all cores than alone on its own: more cores never do that unless
    something else ran (forwards under MIN_GUARDED_S are timer jitter, not checked)."""
    return verify.cost(1) >= MIN_GUARDED_S and measured["verify_wide"][0] > MAX_WIDE_SLOWDOWN * verify.cost(1)


def load_decision(config: EngineConfig) -> dict | None:
    """{"mode", "reason", "verify_costs_id"} decided at an earlier start with this configuration, or None."""
    try:
        with open(_decision_path(config)) as f:
            decision = json.load(f)
        return decision if {"mode", "reason", "verify_costs_id"} <= set(decision) else None
    except (OSError, ValueError):
        return None


def save_decision(config: EngineConfig, mode: str, reason: str, verify_costs_id: str | None) -> None:
    _write_json(_decision_path(config), {"mode": mode, "reason": reason, "verify_costs_id": verify_costs_id})


def _decision_path(config: EngineConfig) -> str:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "mode"}
    key = json.dumps({"format": FORMAT_VERSION, "config": settings}, sort_keys=True, default=str)
    return os.path.join(config.cache_dir, "costs", f"mode-decision-{hashlib.sha1(key.encode()).hexdigest()}.json")


def _write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp_path, path)


def _mode_costs(verify: ForwardCosts, draft: ForwardCosts, seconds: dict[str, list[float]]) -> ModeCosts:
    return ModeCosts(verify, draft, **{name: ForwardCosts(tuple(values)) for name, values in seconds.items()})


def _await(workers: dict[str, WorkerHandle], name: str, measured: dict, receive, timeout_s: float) -> None:
    """Collect Measured answers into `measured` until `name` ("<role>_<placement>") is among them."""
    role, deadline = name.split("_")[0], time.monotonic() + timeout_s
    while name not in measured and time.monotonic() < deadline:
        msg = receive(0.1)
        if isinstance(msg, Measured):
            measured[f"{msg.role}_{msg.placement}"] = msg.seconds
        elif isinstance(msg, WorkerFailed):
            raise MeasureError(f"{msg.role} worker failed while measuring: {msg.error}")
        elif msg is None and not workers[role].is_alive:
            raise MeasureError(f"{role} worker exited while measuring")
    if name not in measured:
        raise MeasureError(f"{role} worker did not answer within {timeout_s:.0f}s while measuring")


def _cache_path(workers: dict[str, WorkerHandle], config: EngineConfig) -> str:
    key = {"format": FORMAT_VERSION, "verify": workers["verify"].ready.runtime.get("costs_id"),
           "draft": workers["draft"].ready.runtime.get("costs_id"),
           "wide_cores": config.replace(mode="ar").cores_of("verify")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(config.cache_dir, "costs", f"mode-{digest}.json")
