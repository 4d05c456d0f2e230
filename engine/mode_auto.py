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
keyed by what both workers' start-up costs depended on (their `costs_id`s) and the cores.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from engine.config import EngineConfig
from engine.cost_model import ForwardCosts, ModeCosts
from engine.messages import Measure, Measured, MeasureStop, WorkerFailed
from engine.worker_handle import WorkerHandle

logger = logging.getLogger("amusd.engine")
FORMAT_VERSION = 1


class MeasureError(RuntimeError):
    """A worker failed or did not answer while measuring."""


def measure_mode_costs(workers: dict[str, WorkerHandle], config: EngineConfig, receive) -> ModeCosts:
    """ModeCosts for `choose_mode` from an idle async pair (`receive(timeout_s)`: the next worker message)."""
    verify, draft = (ForwardCosts(tuple(workers[role].ready.runtime["forward_costs_s"])) for role in ("verify", "draft"))
    path = _cache_path(workers, config)
    try:
        with open(path) as f:
            cached = json.load(f)["seconds"]
        return _mode_costs(verify, draft, cached)
    except (OSError, ValueError, KeyError):
        pass
    logger.info("mode auto: measuring each worker while the other runs, then each alone on all cores (once)")
    measured: dict[str, list[float]] = {}
    for role in ("verify", "draft"):
        workers[role].cmd_queue.put(Measure("together"))
    measured["verify_together"] = _await(workers, "verify", receive, config.step_timeout_s)
    workers["draft"].cmd_queue.put(MeasureStop())
    measured["draft_together"] = _await(workers, "draft", receive, config.step_timeout_s)
    for role in ("verify", "draft"):
        workers[role].cmd_queue.put(Measure("wide"))
        measured[f"{role}_wide"] = _await(workers, role, receive, config.step_timeout_s)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w") as f:
        json.dump({"seconds": measured}, f, indent=1)
    os.replace(tmp_path, path)
    return _mode_costs(verify, draft, measured)


def _mode_costs(verify: ForwardCosts, draft: ForwardCosts, seconds: dict[str, list[float]]) -> ModeCosts:
    return ModeCosts(verify, draft, **{name: ForwardCosts(tuple(values)) for name, values in seconds.items()})


def _await(workers: dict[str, WorkerHandle], role: str, receive, timeout_s: float) -> list[float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = receive(0.1)
        if isinstance(msg, Measured) and msg.role == role:
            return msg.seconds
        if isinstance(msg, WorkerFailed):
            raise MeasureError(f"{msg.role} worker failed while measuring: {msg.error}")
        if msg is None and not workers[role].is_alive:
            raise MeasureError(f"{role} worker exited while measuring")
    raise MeasureError(f"{role} worker did not answer within {timeout_s:.0f}s while measuring")


def _cache_path(workers: dict[str, WorkerHandle], config: EngineConfig) -> str:
    key = {"format": FORMAT_VERSION, "verify": workers["verify"].ready.runtime.get("costs_id"),
           "draft": workers["draft"].ready.runtime.get("costs_id"),
           "wide_cores": config.replace(mode="ar").cores_of("verify")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(config.cache_dir, "costs", f"mode-{digest}.json")
