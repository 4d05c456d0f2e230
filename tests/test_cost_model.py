"""engine/cost_model.py and engine/hardware.py: pure-Python decisions, no torch, no workers."""
from __future__ import annotations

import itertools
import random

import pytest

from engine import hardware
from engine.cost_model import (AcceptanceEstimator, ForwardCosts, SpeculationBudget, best_sync_batch_sizes,
                               best_sync_length, best_verify_budget, choose_mode, expected_committed, predict_tokens_per_s,
                               ModeCosts)

FLAT = ForwardCosts((0.10, 0.105, 0.11, 0.115, 0.12, 0.125, 0.13, 0.135, 0.14))       # native-bf16 / int8 CPU
LINEAR = ForwardCosts(tuple(0.10 * k for k in range(1, 10)))                           # AVX2 bf16: k tokens = k steps


def test_expected_committed():
    assert expected_committed(0, 0.7) == pytest.approx(1.0)
    assert expected_committed(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_committed(4, 1.0) == 5


def test_linear_extrapolation_past_the_measured_range():
    costs = ForwardCosts((1.0, 2.0, 3.0))
    assert costs.cost(5) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        ForwardCosts((0.0,))


def test_flat_costs_check_many_tokens_linear_costs_check_few():
    assert best_verify_budget(FLAT, 0.8, 8) >= 6
    assert best_verify_budget(LINEAR, 0.8, 8) == 0          # k tokens cost k steps: speculation cannot pay
    assert best_verify_budget(FLAT, 0.1, 8) <= 1            # a hopeless draft is not worth checking


def test_sync_length_grows_with_acceptance_and_shrinks_with_draft_cost():
    cheap_draft, dear_draft = ForwardCosts((0.01,)), ForwardCosts((0.08,))
    assert best_sync_length(FLAT, cheap_draft, 0.9, 8) > best_sync_length(FLAT, cheap_draft, 0.5, 8)
    assert best_sync_length(FLAT, cheap_draft, 0.8, 8) > best_sync_length(FLAT, dear_draft, 0.8, 8)


def test_choose_mode():
    draft = ForwardCosts((0.03, 0.032))
    plan = choose_mode(ModeCosts(FLAT, draft), 0.8, 8)
    assert plan.mode == "async" and "async" in plan.reason and set(plan.tokens_per_s) == {"ar", "sync", "async"}
    assert choose_mode(ModeCosts(LINEAR, ForwardCosts((0.2,))), 0.8, 8).mode == "ar"   # slow draft, linear verify
    assert choose_mode(ModeCosts(FLAT), 0.8, 8).mode == "ar"
    # async is never predicted slower than ar: it can always check nothing
    assert predict_tokens_per_s("async", LINEAR, draft, 0.3, 8) >= predict_tokens_per_s("ar", LINEAR, draft, 0.3, 8)


def test_choose_mode_uses_the_costs_each_mode_runs_at():
    """Measured on one AVX512_BF16 EPYC (2 cores), 1.5B int8 verify + 0.5B int8-fast draft: alone on one
    core c_v(1) 93 ms, c_d(1) 40 ms; on both cores 70 / 38 ms. Together the two workers share the memory
    system, so each runs slower than alone; ar on both cores gets the second core's bandwidth."""
    verify = ForwardCosts((0.093, 0.11, 0.12, 0.13, 0.154))
    draft = ForwardCosts((0.040, 0.042))
    alone = ModeCosts(verify, draft)
    assert choose_mode(alone, 0.7, 4).mode == "async"                     # one worker at a time: async looks best
    slowed = ModeCosts(verify, draft, verify_together=ForwardCosts(tuple(1.6 * s for s in verify.seconds)),
                       draft_together=ForwardCosts((0.064, 0.067)),
                       verify_wide=ForwardCosts((0.070, 0.082, 0.09, 0.095, 0.09)), draft_wide=ForwardCosts((0.038,)))
    plan = choose_mode(slowed, 0.7, 4)
    assert plan.mode == "ar", plan.reason
    assert "ar: verify c(1) 70.0 ms" in plan.reason and "async: verify c(1) 148.8 ms, draft 64.0 ms" in plan.reason
    assert plan.tokens_per_s["ar"] == pytest.approx(1 / 0.070)
    # with little contention (two devices) async wins again
    mild = ModeCosts(verify, draft, verify_together=ForwardCosts(tuple(1.05 * s for s in verify.seconds)),
                     draft_together=draft, verify_wide=verify, draft_wide=draft)
    assert choose_mode(mild, 0.7, 4).mode == "async"
    assert slowed.for_mode("sync") == (slowed.verify_wide, slowed.draft_wide)


def test_acceptance_estimator_learns_the_geometric_rate():
    estimator = AcceptanceEstimator(prior=0.5)
    for _ in range(300):            # accept 3 of 4 proposed, then reject: a = 3 / (3 + 1)
        estimator.record(4, 3)
    assert estimator.rate == pytest.approx(0.75, abs=0.02)
    for _ in range(300):
        estimator.record(4, 4)
    assert estimator.rate > 0.95


def test_speculation_budget_fixed_setting_wins():
    budget = SpeculationBudget(LINEAR, max_tokens=8, num_fixed=5)
    assert budget.num_to_check() == 5 and budget.num_to_draft() == 5
    adaptive = SpeculationBudget(FLAT, max_tokens=8, draft=ForwardCosts((0.02,)))
    for _ in range(200):
        adaptive.record(4, 0)        # nothing ever accepted
    assert adaptive.num_to_check() == 1 and adaptive.num_to_draft() == 1     # a one-token probe, never 0
    assert SpeculationBudget(LINEAR, max_tokens=8).num_to_check() == 1


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                                             ({"amx_bf16", "avx512f"}, "bfloat16")])
def test_dtype_auto_follows_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    dtype, reason = hardware.resolve_dtype("auto", "cpu")
    assert dtype == expected and reason
    assert hardware.resolve_dtype("auto", "cuda:1")[0] == "bfloat16"
    assert hardware.resolve_dtype("float64", "cpu") == ("float64", "set in the configuration")
    assert hardware.resolve_dtype("auto", "cpu", "int4")[0] == "float32"        # the 4-bit kernel takes fp32


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx512f", "avx512_bf16"}, {"amx_bf16", "avx512f"}])
@pytest.mark.parametrize("quantization", ["auto", "int8", "int8-fast", "int4", "int4-mixed", "nf4"])
def test_dtype_auto_is_fp32_under_cpu_int8_layers(monkeypatch, flags, quantization):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.resolve_dtype("auto", "cpu", quantization)[0] == "float32"
    assert hardware.resolve_dtype("auto", "cuda:0", quantization)[0] == "bfloat16"
    assert hardware.resolve_dtype("bfloat16", "cpu", quantization)[0] == "bfloat16"


def test_quantization_auto(monkeypatch):
    assert hardware.resolve_quantization("auto", "cpu", "float32", "verify")[0] == "int8"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert hardware.resolve_quantization("auto", "cpu", "float32", "draft")[0] == "int8-fast"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: object())     # bitsandbytes "installed"
    assert hardware.resolve_quantization("auto", "cpu", "float32", "draft")[0] == "nf4"
    assert hardware.resolve_quantization("auto", "cpu", "float32", "verify")[0] == "int8"
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    assert hardware.resolve_quantization("auto", "cpu", "float32", "draft")[0] == "int8-fast"
    assert hardware.resolve_quantization("auto", "cuda:0", "bfloat16", "verify")[0] == "none"
    assert hardware.resolve_quantization("auto", "cpu", "float64", "verify")[0] == "none"
    assert hardware.resolve_quantization("int4", "cpu", "float32", "verify")[0] == "int4"


@pytest.mark.parametrize("flags, build, expected", [
    ({"avx2", "fma", "f16c"}, "avx2", "int4-mixed"),                      # AVX2 class with the kernel built
    ({"avx2", "fma", "f16c"}, None, "int8"),                              # no compiler / the build failed
    ({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512vl"}, "avx512-vnni", "int4-mixed"),  # VNNI build
    ({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512vl", "amx_int8"}, "avx512-vnni", "int4-mixed"),
    ({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512vl", "amx_int8", "amx_tile"}, "amx", "int4-mixed"),
    ({"avx2", "fma", "f16c", "avx512f", "avx512_vnni"}, "avx2", "int8"),  # VNNI build refused: AVX2 build unmeasured
    ({"avx2", "fma", "f16c", "avx512f"}, "avx2", "int8"),                 # AVX-512 without VNNI: unmeasured
    ({"avx2", "fma", "f16c", "avx_vnni"}, "avx-vnni", "int4-mixed"),
    ({"avx", "sse4_2"}, None, "int8")])
def test_quantization_auto_takes_the_4bit_kernel_where_it_was_measured_to_win(monkeypatch, flags, build, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    kernel_build = lambda: build                                                          # noqa: E731
    assert hardware.resolve_quantization("auto", "cpu", "float32", "verify", kernel_build)[0] == expected
    assert hardware.resolve_quantization("auto", "cpu", "float32", "draft", kernel_build)[0] == "int8-fast"
    assert hardware.resolve_quantization("auto", "cuda:0", "bfloat16", "verify", kernel_build)[0] == "none"


def test_cpu_summary_names_the_simd_flags():
    summary = hardware.cpu_summary()
    assert set(summary) >= {"model_name", "arch", "simd", "has_native_bf16"}


def test_without_a_draft_worker_the_cpu_verify_takes_both_cores():
    from engine.config import ConfigError, EngineConfig
    for mode in ("ar", "sync"):
        config = EngineConfig(verify_model="v", draft_model="d", mode=mode)
        assert config.cores_of("verify") == (0, 1) and config.threads_of("verify") == 2
    ar_alone = EngineConfig(verify_model="v", mode="ar")
    assert ar_alone.cores_of("verify") == (0, 1)
    for mode in ("async", "auto"):            # auto measures in the async layout, then settles
        config = EngineConfig(verify_model="v", draft_model="d", mode=mode)
        assert config.cores_of("verify") == (0,) and config.cores_of("draft") == (1,)
        assert config.threads_of("verify") == config.threads_of("draft") == 1
    assert EngineConfig(verify_model="v", mode="ar", verify_threads=1).threads_of("verify") == 1   # a setting wins
    assert EngineConfig(verify_model="v", mode="ar", verify_cores=None).threads_of("verify") is None
    assert EngineConfig(verify_model="v", mode="ar", verify_device="cuda:0").cores_of("verify") == (0,)
    with pytest.raises(ConfigError):
        EngineConfig(verify_model="v", verify_threads=-1)


def test_async_counts_the_step_after_a_rejection_as_one_with_nothing_to_check():
    """After a rejected draft the draft restarts from the verify's correction, which it learns when
    that step ends: the next step has no drafts. Measured (default pair, one chat stream, a = 0.74,
    n = 1): 1.51 tokens per step, not E(1) = 1.74."""
    from engine.cost_model import async_step_mix, async_tokens_per_s
    r = async_step_mix(1, 0.74)
    assert r * expected_committed(1, 0.74) + (1 - r) == pytest.approx(1.59, abs=0.01)
    assert async_step_mix(0, 0.74) == 1.0 and async_step_mix(4, 1.0) == 1.0        # nothing rejected: always drafts
    # a step with drafts 0.106 s, a bare one 0.097 s
    assert async_tokens_per_s(1, 0.74, 0.106, 0.097) == pytest.approx(1.587 / (r * 0.106 + (1 - r) * 0.097), rel=1e-3)
    assert predict_tokens_per_s("async", FLAT, ForwardCosts((0.001,)), 0.74, 1) == \
        pytest.approx(async_tokens_per_s(1, 0.74, FLAT.cost(2), FLAT.cost(1)))                    # the n = 1 step wins


def test_acceptance_fades_back_to_the_prior_while_nothing_is_checked():
    """Async batching's wide passes check no drafts: the estimate must not freeze where it fell."""
    estimator = AcceptanceEstimator(prior=0.7)
    for _ in range(100):
        estimator.record(3, 0)
    assert estimator.rate < 0.1
    rates = []
    for _ in range(400):
        estimator.fade()
        rates.append(estimator.rate)
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.7, abs=0.01)


# one sequence's c(k) on the AMX Xeon's two cores (int4-mixed verify 1.5B, int8 draft 0.5B), rounded
VERIFY_2CORES = ForwardCosts((0.058, 0.063, 0.068, 0.074, 0.077, 0.080, 0.083, 0.086, 0.089))
DRAFT_2CORES = ForwardCosts((0.027, 0.028, 0.029, 0.030, 0.031, 0.032, 0.033, 0.034, 0.035))


def test_a_full_sync_batch_drafts_nothing_one_stream_keeps_its_draft():
    """8 streams: one more verify row buys < 1 token, the draft round for it costs a draft forward."""
    assert best_sync_batch_sizes(VERIFY_2CORES, DRAFT_2CORES, [(1, 0.9)] + [(0, 0.9)] * 7) == [0] * 8
    for rate in (0.6, 0.9, 0.95):                    # one stream: sync's own k* is not cut
        k = best_sync_length(VERIFY_2CORES, DRAFT_2CORES, rate, 8)
        assert best_sync_batch_sizes(VERIFY_2CORES, DRAFT_2CORES, [(k, rate)]) == [k]
    assert best_sync_batch_sizes(VERIFY_2CORES, DRAFT_2CORES, []) == []


def test_sync_batch_sizes_are_the_best_the_prediction_knows():
    """Against every size vector below the proposals (1-5 rows, up to 4 tokens each, random rates)."""
    def rate(sizes, rates):                          # the docstring's prediction, written out
        rounds = sum(DRAFT_2CORES.cost(sum(k >= r for k in sizes)) for r in range(1, max(sizes) + 1))
        committed = sum(expected_committed(k, a) for k, a in zip(sizes, rates))
        return committed / (VERIFY_2CORES.cost(len(sizes) + sum(sizes)) + rounds)
    rng = random.Random(0)
    for _ in range(200):
        num_rows = rng.randint(1, 5)
        sizes, rates = [rng.randint(0, 4) for _ in range(num_rows)], [rng.uniform(0.3, 0.97) for _ in range(num_rows)]
        got = best_sync_batch_sizes(VERIFY_2CORES, DRAFT_2CORES, list(zip(sizes, rates)))
        assert all(0 <= k <= limit for k, limit in zip(got, sizes))
        best = max(rate(list(c), rates) for c in itertools.product(*[range(k + 1) for k in sizes]))
        assert rate(got, rates) == pytest.approx(best, rel=1e-12)
    assert best_sync_batch_sizes(VERIFY_2CORES, DRAFT_2CORES, [(3, 0.9), (3, 0.2)]) == [0, 0]   # 2 rows as ar
    assert best_sync_batch_sizes(FLAT, ForwardCosts((1e-6,)), [(3, 0.8), (3, 0.8)]) == [3, 3]  # free drafts
