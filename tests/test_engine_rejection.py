"""Rejection sampling through live workers is lossless in distribution (chi-square, tiny models).

The first two generated tokens of many seeded requests (top-k 3, T = 1) are compared with the
verify model's exact joint distribution, computed here by enumeration with plain torch (full
recompute, top-k and softmax written out: no engine code). sync proposes k = 2 draft tokens every
round and async publishes its q rows through the shared ring, so both paths (accept, residual
resample, bonus) run. The same test, run against live workers that carry a broken verifier
(tests/rejection_mutants.py, installed in the workers by tests/mutants/sitecustomize.py), must
reject each mutant in every mode at this sample size: that is what shows it can see a bug.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch

from tests.engine_helpers import run, start_engine, tiny_config

PROMPT = [72, 101, 108, 108, 111, 32]
TOP_K = 3
PARAMS = dict(temperature=1.0, top_k=TOP_K, max_tokens=2, ignore_eos=True)
NUM_RUNS = 1200        # at 600 the resample-target mutant gave p ~ 1e-4..5e-4 in async: too close to ALPHA
ALPHA = 1e-3
REPO = Path(__file__).resolve().parents[1]


def exact_joint(model_dir: str) -> dict[tuple[int, int], float]:
    """P(x1, x2) of the verify model under top-k TOP_K, T = 1, each step a forward over the whole prefix."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    def next_probs(ids) -> dict[int, float]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, TOP_K)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, 0).tolist()))

    return {(x1, x2): p1 * p2 for x1, p1 in next_probs(PROMPT).items()
            for x2, p2 in next_probs(PROMPT + [x1]).items()}


def chi_square_pvalue(counts: collections.Counter, expected_probs: dict, num: int) -> float:
    from scipy.stats import chi2
    cells, other_expected, other_observed = [], 0.0, 0
    for key, prob in expected_probs.items():
        if prob * num >= 5:
            cells.append((counts.get(key, 0), prob * num))
        else:                                   # pool sparse cells so the test stays valid
            other_expected += prob * num
            other_observed += counts.get(key, 0)
    other_observed += sum(v for k, v in counts.items() if k not in expected_probs)
    if other_expected > 0 or other_observed:
        cells.append((other_observed, max(other_expected, 1e-12)))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return float(chi2.sf(stat, len(cells) - 1))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _start(cache_dir: str, mode: str, mutant: str | None):
    """Live workers; with `mutant`, they run that broken verifier instead of rejection_verify."""
    # No prefix cache: the verify's prefill of the (same) prompt is what gives the async draft its head
    # start within these 2-token requests, so that both the accept and the reject path run.
    config = tiny_config(cache_dir, mode, sampling_scheme="rejection", num_speculative_tokens=2, prefix_caching=False)
    if mutant is None:
        return start_engine(config)
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "AMUSD_TEST_MUTANT")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests" / "mutants"), str(REPO),
                                                             saved["PYTHONPATH"]]))
    os.environ["AMUSD_TEST_MUTANT"] = mutant
    try:
        return start_engine(config)          # the workers copy the environment when they start
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fit(cache_dir: str, mode: str, mutant: str | None) -> tuple[float, int, int]:
    """(chi-square p-value against the exact joint, draft tokens, accepted tokens) over NUM_RUNS requests."""
    sup = _start(cache_dir, mode, mutant)
    try:
        counts: collections.Counter = collections.Counter()
        num_draft = num_accepted = 0
        for seed in range(NUM_RUNS):
            tokens, final = run(sup, PROMPT, seed=seed, **PARAMS)
            counts[tuple(tokens)] += 1
            num_draft += final.stats.num_draft_tokens
            num_accepted += final.stats.num_accepted_tokens
        joint = exact_joint(sup.tokenizer_dir)
    finally:
        sup.shutdown()
    p_value = chi_square_pvalue(counts, joint, NUM_RUNS)
    print(f"[rejection] {mode} mutant={mutant}: p = {p_value:.3g}, drafted {num_draft}, accepted {num_accepted}")
    return p_value, num_draft, num_accepted


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rejection_sampling_matches_target_distribution(cache_dir, mode):
    p_value, num_draft, num_accepted = _fit(cache_dir, mode, None)
    assert p_value > ALPHA, f"{mode}: empirical distribution differs from the target (p = {p_value:.2g})"
    assert num_draft > 0 and 0 < num_accepted < num_draft, "accept and reject paths must both run"


@pytest.mark.parametrize("mutant", ["accept-everything", "resample-target"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_same_test_rejects_a_broken_verifier(cache_dir, mode, mutant):
    p_value, num_draft, _ = _fit(cache_dir, mode, mutant)
    assert num_draft > 0
    assert p_value < ALPHA, f"{mode} with the {mutant} mutant passed the fit (p = {p_value:.2g}): the test is blind"


def test_rejection_sampling_is_reproducible_per_seed(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "sync", sampling_scheme="rejection"))
    try:
        first = run(sup, PROMPT, seed=7, temperature=0.9, max_tokens=24)[0]
        again = run(sup, PROMPT, seed=7, temperature=0.9, max_tokens=24)[0]
    finally:
        sup.shutdown()
    assert first == again
