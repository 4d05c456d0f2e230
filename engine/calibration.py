"""Each worker times its own forward for k = 1..K tokens at start-up, cached per machine and model.

    costs = load_or_measure(runner, key={...}, cache_dir, max_tokens=9)   # ForwardCosts

The cache file is <cache_dir>/costs/<sha1 of the key>.json; the key names everything the costs
depend on (CPU model and SIMD flags, torch version, model dir and its config, dtype, quantization,
device, threads, cores), so a restart on the same machine pays nothing and any change re-measures.
Measurement: a 64-token random context, then for each k the median of a few forwards of k random
tokens, cropping the cache back after each (~5-15 s for the default pair on one CPU core); then
c(1) once more: a curve whose c(1) drifted by more than MAX_DRIFT meanwhile (another process
started or stopped) is used but not cached, so a passing load is not kept for good.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time

import torch

from engine.cost_model import MIN_GUARDED_S, ForwardCosts
from engine.hardware import cpu_summary
from engine.models import ModelRunner
from engine.quantization import KERNELS_VERSION

logger = logging.getLogger("amusd.engine")
CONTEXT_TOKENS = 64
NUM_REPEATS = 3
MAX_DRIFT = 0.3        # c(1) measured again after the curve may differ this much (a fraction) for it to be cached


def cost_key(model_dir: str, **settings) -> dict:
    """Everything a forward's cost depends on."""
    config_path = os.path.join(model_dir, "config.json")
    config_hash = ""
    if os.path.isfile(config_path):
        with open(config_path, "rb") as f:
            config_hash = hashlib.sha1(f.read()).hexdigest()
    return {"cpu": cpu_summary(), "torch": torch.__version__, "kernels": KERNELS_VERSION,
            "model_dir": os.path.abspath(model_dir),
            "model_config": config_hash, **settings}


def measure_forward_costs(runner: ModelRunner, max_tokens: int) -> ForwardCosts:
    generator = torch.Generator().manual_seed(0)
    vocab = runner.vocab_size
    runner.prefill(torch.randint(0, vocab, (CONTEXT_TOKENS + 1,), generator=generator).tolist())
    runner.forward(torch.randint(0, vocab, (max_tokens,), generator=generator).tolist())  # warm-up
    runner.crop(CONTEXT_TOKENS)
    seconds = []
    for k in range(1, max_tokens + 1):
        times = []
        for _ in range(NUM_REPEATS):
            tokens = torch.randint(0, vocab, (k,), generator=generator).tolist()
            start = time.perf_counter()
            runner.forward(tokens)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            times.append(time.perf_counter() - start)
            runner.crop(CONTEXT_TOKENS)
        seconds.append(statistics.median(times))
    runner.reset()
    # A k-token forward never costs less than a (k-1)-token one; timing noise can say otherwise.
    for i in range(1, len(seconds)):
        seconds[i] = max(seconds[i], seconds[i - 1])
    return ForwardCosts(tuple(seconds))


def measure_one_token_until(runner: ModelRunner, should_stop, max_seconds: float) -> ForwardCosts:
    """c(1) as the median of one-token forwards repeated until should_stop() (or max_seconds): the
    load under which another worker measures, and this worker's cost under its load."""
    generator = torch.Generator().manual_seed(1)
    runner.prefill(torch.randint(0, runner.vocab_size, (CONTEXT_TOKENS + 1,), generator=generator).tolist())
    deadline, times = time.perf_counter() + max_seconds, []
    while not times or (not should_stop() and time.perf_counter() < deadline):
        start = time.perf_counter()
        runner.forward(torch.randint(0, runner.vocab_size, (1,), generator=generator).tolist())
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        times.append(time.perf_counter() - start)
        runner.crop(CONTEXT_TOKENS)
    runner.reset()
    return ForwardCosts((statistics.median(times),))


def cost_digest(key: dict, max_tokens: int) -> str:
    return hashlib.sha1(json.dumps({**key, "max_tokens": max_tokens}, sort_keys=True).encode()).hexdigest()


def load_or_measure(runner: ModelRunner, key: dict, cache_dir: str, max_tokens: int) -> ForwardCosts:
    path = os.path.join(cache_dir, "costs", f"{cost_digest(key, max_tokens)}.json")
    try:
        with open(path) as f:
            return ForwardCosts(tuple(json.load(f)["seconds"]))
    except (OSError, ValueError, KeyError):
        pass
    logger.info("measuring forward costs for k = 1..%d tokens (%s, once per machine and model)",
                max_tokens, key.get("role", ""))
    costs = measure_forward_costs(runner, max_tokens)
    again = measure_forward_costs(runner, 1).cost(1)
    first = costs.cost(1)
    if min(again, first) >= MIN_GUARDED_S and abs(again - first) > MAX_DRIFT * min(again, first):
        logger.warning("forward costs drifted while measuring (c(1) %.1f ms, then %.1f ms): the load on this "
                       "machine changed; used now, not cached (measured again at the next start)",
                       first * 1e3, again * 1e3)
        return costs
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w") as f:
        json.dump({"key": key, "seconds": list(costs.seconds)}, f, indent=1)
    os.replace(tmp_path, path)
    return costs
