"""Rejection sampling through live workers is lossless in distribution (chi-square, tiny models).

The first two generated tokens of many seeded requests (top-k 3, T = 1) are compared with the
verify model's exact joint distribution, computed by enumeration in this process. sync proposes
k draft tokens every round and async publishes its q rows through the shared ring, so both paths
(accept, residual resample, bonus) are exercised. The function-level tests in test_sampling.py show
the same test rejects a broken verifier.
"""
from __future__ import annotations

import collections

import pytest
import torch

from engine.messages import SamplingParams
from engine.sampling import probs_from_scores, process_logits
from tests.engine_helpers import run, start_engine, tiny_config

PROMPT = [72, 101, 108, 108, 111, 32]
PARAMS = dict(temperature=1.0, top_k=3, max_tokens=2, ignore_eos=True)
NUM_RUNS = 300
ALPHA = 1e-3


def exact_joint(model_dir: str) -> dict[tuple[int, int], float]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    params = SamplingParams(**PARAMS)

    def next_probs(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        return probs_from_scores(process_logits(logits, params))

    joint = {}
    p1 = next_probs(PROMPT)
    for x1 in torch.nonzero(p1).flatten().tolist():
        p2 = next_probs(PROMPT + [x1])
        for x2 in torch.nonzero(p2).flatten().tolist():
            joint[(x1, x2)] = float(p1[x1] * p2[x2])
    return joint


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


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rejection_sampling_matches_target_distribution(cache_dir, mode):
    # No prefix cache: the verify's prefill of the (same) prompt is what gives the async draft its head
    # start within these 2-token requests, so that both the accept and the reject path run.
    sup = start_engine(tiny_config(cache_dir, mode, sampling_scheme="rejection", num_speculative_tokens=2,
                                   prefix_caching=False))
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
    assert p_value > ALPHA, f"{mode}: empirical distribution differs from the target (p = {p_value:.2g})"
    assert num_draft > 0 and 0 < num_accepted < num_draft, "accept and reject paths must both run"


def test_rejection_sampling_is_reproducible_per_seed(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "sync", sampling_scheme="rejection"))
    try:
        first = run(sup, PROMPT, seed=7, temperature=0.9, max_tokens=24)[0]
        again = run(sup, PROMPT, seed=7, temperature=0.9, max_tokens=24)[0]
    finally:
        sup.shutdown()
    assert first == again
