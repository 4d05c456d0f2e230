"""Speed features through live workers on tiny models: quantized identity, mode auto, cost cache,
prefix cache, and what /health and /metrics tell about them."""
from __future__ import annotations

import contextlib
import glob
import json
import os

import httpx
import pytest
import torch

from tests.engine_helpers import random_prompts, run, start_engine, tiny_config

QUANTIZED = dict(dtype="float32", verify_quantization="int8", draft_quantization="int8-fast")
PROMPTS = random_prompts(6, seed=3)
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("speed-cache"))


@pytest.fixture(scope="module")
def quantized_ar(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "ar", **QUANTIZED))
    yield sup
    sup.shutdown()


@pytest.mark.parametrize("mode, extra", [("sync", {}), ("async", {}), ("async", {"num_speculative_tokens": 3})])
def test_quantized_speculation_equals_quantized_ar(cache_dir, quantized_ar, mode, extra):
    sup = start_engine(tiny_config(cache_dir, mode, **QUANTIZED, **extra))
    try:
        num_accepted = 0
        for prompt in PROMPTS:
            expected, _ = run(quantized_ar, prompt, max_tokens=MAX_TOKENS)
            tokens, final = run(sup, prompt, max_tokens=MAX_TOKENS)
            assert tokens == expected, f"{mode} {extra} diverged from ar on the same int8 model"
            num_accepted += final.stats.num_accepted_tokens
            assert final.stats.num_proposed_tokens >= final.stats.num_draft_tokens
            # per draft position (vLLM's _per_pos): they add up, and position i+1 is accepted only after i
            drafted, accepted = final.stats.num_draft_tokens_per_pos, final.stats.num_accepted_tokens_per_pos
            assert sum(drafted) == final.stats.num_draft_tokens and sum(accepted) == final.stats.num_accepted_tokens
            assert all(a <= d for a, d in zip(accepted, drafted)) and accepted == sorted(accepted, reverse=True)
        assert num_accepted > 0, "the draft must have contributed"
        seeded = dict(max_tokens=MAX_TOKENS, temperature=0.9, seed=7)
        assert run(sup, PROMPTS[0], **seeded)[0] == run(quantized_ar, PROMPTS[0], **seeded)[0]
    finally:
        sup.shutdown()


def test_async_equals_ar_on_the_avx2_4bit_kernel(cache_dir):
    from engine import quant_q4
    if not quant_q4.available():
        pytest.skip(f"q4 kernel: {quant_q4.unavailable_reason()}")
    four_bit = dict(dtype="float32", verify_quantization="int4", draft_quantization="int4")
    engines = {mode: start_engine(tiny_config(cache_dir, mode, **four_bit)) for mode in ("ar", "async")}
    try:
        assert engines["ar"].health()["workers"]["verify"]["quantization"] == "int4"
        for prompt in PROMPTS[:3]:
            expected, _ = run(engines["ar"], prompt, max_tokens=MAX_TOKENS)
            assert run(engines["async"], prompt, max_tokens=MAX_TOKENS)[0] == expected
    finally:
        for sup in engines.values():
            sup.shutdown()


def test_mode_auto_settles_on_a_mode_and_caches_costs(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "auto", **QUANTIZED))
    try:
        health = sup.health()
        assert health["mode"] in ("ar", "sync", "async")
        assert health["mode_reason"].startswith(f"mode auto chose {health['mode']}")
        verify = health["workers"]["verify"]
        assert verify["dtype"] == "float32" and verify["quantization"] == "int8"
        assert len(verify["forward_costs_s"]) == sup.config.max_verify_tokens + 1
        assert all(c > 0 for c in verify["forward_costs_s"])
        tokens, final = run(sup, PROMPTS[1], max_tokens=8)
        assert len(tokens) == 8 and final.finish_reason == "length"
    finally:
        sup.shutdown()
    # each mode is predicted from the costs it runs at: the workers together (async), alone on all cores (ar, sync)
    assert "ar: verify c(1)" in health["mode_reason"] and "async: verify c(1)" in health["mode_reason"]
    mode_files = glob.glob(os.path.join(cache_dir, "costs", "mode-*.json"))
    if health["mode_reason"].endswith("(measured while something else ran: not kept)"):
        # this shared machine was busy while it measured, twice (engine/mode_auto.py): nothing is kept,
        # so the next start measures and decides again
        assert not mode_files
        sup = start_engine(tiny_config(cache_dir, "auto", **QUANTIZED))
        again = sup.health()
        sup.shutdown()
        assert "at an earlier start" not in again["mode_reason"]
        pytest.skip("the machine was busy while measuring: the cached path was not exercised this run")
    [mode_file] = [f for f in mode_files if not os.path.basename(f).startswith("mode-decision-")]
    with open(mode_file) as f:
        measured = json.load(f)["seconds"]
    assert set(measured) == {"verify_together", "draft_together", "verify_wide", "draft_wide"}
    assert len(measured["verify_together"]) == len(measured["verify_wide"]) == sup.config.max_verify_tokens + 1
    assert all(s > 0 for values in measured.values() for s in values)
    cost_files = sorted(glob.glob(os.path.join(cache_dir, "costs", "*.json")))
    assert cost_files, "forward costs must be cached"
    mtimes = [os.path.getmtime(f) for f in cost_files]
    sup = start_engine(tiny_config(cache_dir, "auto", **QUANTIZED))      # a restart reads, never re-measures
    again = sup.health()
    sup.shutdown()
    assert sorted(glob.glob(os.path.join(cache_dir, "costs", "*.json"))) == cost_files
    assert [os.path.getmtime(f) for f in cost_files] == mtimes
    # ... and starts in the decided mode directly (no async start, no restart)
    assert again["mode"] == health["mode"] and "at an earlier start of this configuration" in again["mode_reason"]
    assert all(w["num_restarts"] == 0 for w in again["workers"].values())


def test_mode_auto_decides_again_when_the_decision_is_stale(cache_dir):
    """A decision whose verify costs_id no longer matches (other kernels, model files, CPU) is not reused."""
    from engine.mode_auto import load_decision, save_decision
    config = tiny_config(cache_dir, "auto", **QUANTIZED, max_verify_tokens=5)
    save_decision(config, "ar", "a stale decision", verify_costs_id="not-this-one")
    sup = start_engine(config)
    try:
        health = sup.health()
        assert health["mode_reason"].startswith(f"mode auto chose {health['mode']}: predicted"), health["mode_reason"]
        tokens, final = run(sup, PROMPTS[2], max_tokens=6)
        assert len(tokens) == 6
        decision = load_decision(config)
        assert decision["verify_costs_id"] == health["workers"]["verify"]["costs_id"]
        assert decision["mode"] == health["mode"]
    finally:
        sup.shutdown()


def test_prefix_cache_reuses_the_common_prefix_and_changes_nothing(cache_dir):
    from transformers import AutoModelForCausalLM

    from engine.models import ModelRunner
    from engine.tiny_models import ensure_tiny_model
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny-random/verify", cache_dir),
                                                 dtype=torch.float64).eval()
    shared = list(range(10, 40))
    first, second = shared + [50, 51, 52], shared + [60, 61]
    warm = ModelRunner(model, "cpu", prefill_chunk_tokens=7)
    assert warm.prefill(first) == 0
    warm.forward([first[-1], 70])                         # decode a little: the cache now holds more
    assert warm.prefill(second) == len(shared)            # only the shared prompt prefix is kept
    cold = ModelRunner(model, "cpu")
    cold.prefill(second)
    assert warm.cached_ids == cold.cached_ids == second[:-1]
    assert torch.allclose(warm.forward([second[-1]]), cold.forward([second[-1]]), atol=1e-10)


def test_a_prefill_runs_wide_for_a_long_uncached_prompt_only(cache_dir):
    from transformers import AutoModelForCausalLM

    from engine.models import MIN_WIDE_PREFILL_TOKENS, ModelRunner, PrefillPlacement
    from engine.tiny_models import ensure_tiny_model
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny-random/verify", cache_dir),
                                                 dtype=torch.float64).eval()
    runner = ModelRunner(model, "cpu", prefill_chunk_tokens=32)
    long = [10 + i % 50 for i in range(MIN_WIDE_PREFILL_TOKENS + 1)]     # MIN new tokens + the pending one
    assert not runner.prefills_wide(long)                                 # no placement: never
    runner.prefill_placement = PrefillPlacement((0,))
    assert runner.prefills_wide(long) and not runner.prefills_wide(long[:-1])
    widened = []
    runner.prefill_placement.widened = lambda: (widened.append(True), contextlib.nullcontext())[1]
    runner.prefill(long)
    assert widened == [True]
    follow_up = long + [7, 8, 9]                                           # the prefix cache holds the rest
    assert not runner.prefills_wide(follow_up) and runner.prefills_wide(follow_up, is_scoring=True)
    runner.prefill(follow_up)
    assert widened == [True]                                               # the short rest ran narrow


def test_health_and_metrics_show_dtype_quantization_and_costs(server):
    health = httpx.get(server.url("/health"), timeout=10).json()
    verify = health["workers"]["verify"]
    assert {"dtype", "dtype_reason", "quantization", "quantization_reason", "forward_costs_s"} <= set(verify)
    assert health["mode"] and health["mode_reason"]
    response = server.openai().completions.create(model=server.model, prompt="hi", max_tokens=4, temperature=0)
    assert response.usage.completion_tokens == 4
    metrics = httpx.get(server.url("/metrics"), timeout=10).text
    assert 'amusd:forward_cost_seconds{num_tokens="1",worker="verify"}' in metrics
    assert "amusd:spec_decode_budget_tokens_count" in metrics


def test_config_edge_cases_from_two_gpu_deployments():
    from engine.config import ConfigError, EngineConfig
    from engine.hardware import check_memory_ordering
    config = EngineConfig(verify_model="v", draft_model="d", mode="async", draft_device="cuda", verify_device="cuda")
    assert (config.draft_device, config.verify_device) == ("cuda:0", "cuda:0")     # "cuda" alone crashed a worker
    assert any("share cuda:0" in w for w in config.warnings())
    assert not EngineConfig(verify_model="v", draft_model="d", draft_device="cuda:0", verify_device="cuda:1").warnings()
    with pytest.raises(ConfigError, match="needs an x86-64 host"):
        check_memory_ordering(EngineConfig(verify_model="v", draft_model="d", mode="async"), machine="aarch64")
    check_memory_ordering(EngineConfig(verify_model="v", mode="ar"), machine="aarch64")           # ar is fine
    check_memory_ordering(EngineConfig(verify_model="v", draft_model="d", mode="async"), machine="x86_64")
