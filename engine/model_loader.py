"""Load one model for a worker the way the hardware wants it: dtype, quantization, measured costs.

    loaded = load_model("verify", config, device="cpu")
    loaded.runner       ModelRunner (model + KV cache)
    loaded.runtime      {"dtype", "dtype_reason", "quantization", "quantization_reason", "decoder",
                         "forward_costs_s": [c(1), ..., c(K)], "costs_id" (what they depend on, hashed),
                         "threads", "device"}

Resolves `dtype: auto` and `*_quantization: auto` (engine/hardware.py), loads and quantizes
(engine/quantization.py), then times the forward for k = 1..K tokens or reads it from the cache
(engine/calibration.py). Runs inside a worker process (imports torch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.config import ConfigError, EngineConfig
from engine.cost_model import ForwardCosts
from engine.hardware import resolve_dtype, resolve_quantization

logger = logging.getLogger("amusd.engine")


@dataclass
class LoadedModel:
    runner: object                 # engine.models.ModelRunner
    model_dir: str
    costs: ForwardCosts
    runtime: dict


def load_model(role: str, config: EngineConfig, device: str, num_cost_tokens: int,
               worker_role: str | None = None) -> LoadedModel:
    """Load the verify or draft model of `config` onto `device` and measure its forward costs.

    worker_role: the worker process it runs in (sync loads the draft in the verify worker).
    """
    from engine import quant_q4
    from engine.calibration import cost_digest, cost_key, load_or_measure
    from engine.models import ModelRunner, load_causal_lm, resolve_model_spec
    settings = config.model_settings(role)
    dtype, dtype_reason = resolve_dtype(config.dtype, device, settings.quantization)
    quantization, quantization_reason = resolve_quantization(settings.quantization, device, dtype, role, quant_q4.build_name)
    path, gguf = resolve_model_spec(settings.model, config.cache_dir, settings.gguf_file)
    model = load_causal_lm(path, gguf, device, dtype, quantization, keep_float_head=settings.num_head_ids > 0,
                           is_draft=role == "draft")
    try:
        runner = ModelRunner(model, device, config.prefill_chunk_tokens, config.prefix_caching, config.decoder)
    except ValueError as exc:
        raise ConfigError(f"{role} model {path}: {exc}") from exc
    runner.is_mapping_unknown_ids = role == "draft"     # the verify may commit ids past the draft's rows
    try:
        runner.use_vocab_subset(settings.num_head_ids, quantization)
    except ValueError as exc:
        raise ConfigError(f"{role} model {path}: {exc}") from exc
    import torch
    threads = torch.get_num_threads()
    key = cost_key(path, role=role, gguf=gguf, dtype=dtype, quantization=quantization, decoder=runner.decoder.name,
                   device=device, threads=threads, cores=config.cores_of(worker_role or role),
                   head_ids=runner.subset_head.num_ids if runner.subset_head else None)
    costs = load_or_measure(runner, key, config.cache_dir, num_cost_tokens)
    runtime = {"device": device, "threads": threads, "dtype": dtype, "dtype_reason": dtype_reason,
               "quantization": quantization, "quantization_reason": quantization_reason,
               "decoder": runner.decoder.name,
               "forward_costs_s": list(costs.seconds), "costs_id": cost_digest(key, num_cost_tokens)}
    logger.info("%s model %s: %s (%s); quantization %s (%s); %s decoder; forward ms by tokens: %s", role, path,
                dtype, dtype_reason, quantization, quantization_reason, runner.decoder.name,
                [round(s * 1e3, 1) for s in costs.seconds])
    return LoadedModel(runner, path, costs, runtime)
