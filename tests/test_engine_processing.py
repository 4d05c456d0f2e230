"""Logits processors and prompt logprobs on live engines (tiny float64 models, real workers).

    identity         penalties + logit_bias + min_tokens: sync and async (the tiny draft, the verify
                     model as its own draft, an always-wrong one, which forces rollbacks) emit exactly
                     ar's tokens, greedy and seeded
    min_tokens       a stop id cannot end the sequence before min_tokens, in every mode
    rejection        async rejection sampling with processors runs and never emits a removed token
    prompt logprobs  equal a plain full-prompt forward's log_softmax (chunked prefill, after a prefix-cache hit)
"""
from __future__ import annotations

import pytest
import torch

from engine.tiny_models import ensure_tiny_model
from tests.engine_helpers import running_engines, random_prompts, run, start_engine, tiny_config

PROMPTS = random_prompts(3, seed=21)
BANNED = 66                       # logit_bias -100: never emitted
PROCESSING = dict(presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3,
                  logit_bias={65: 6.0, BANNED: -100.0, 101: 2.5}, min_tokens=4)
PARAM_SETS = [dict(max_tokens=24, **PROCESSING),
              dict(max_tokens=24, temperature=0.8, top_k=40, seed=3, **PROCESSING),
              dict(max_tokens=24, temperature=1.1, seed=4, repetition_penalty=0.7, frequency_penalty=-0.5)]
# "sync-self": the verify model drafts for itself, so with the same processing on both sides nearly
# every drafted token is accepted: a draft that processed its rows with another context would not be.
# (How far an async draft gets ahead depends on the machine's load: the async draft's processing is
# checked in-process, tests/test_logits_processors.py.)
SPEC_ENGINES = {
    "sync-self": dict(mode="sync", draft="tiny-random/verify", num_speculative_tokens=3),
    "sync-wrong": dict(mode="sync", draft="tiny-random/wrong", num_speculative_tokens=2),
    "async": dict(mode="async"),
    "async-wrong": dict(mode="async", draft="tiny-random/wrong"),
}
PREFILL_CHUNK = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def engines(cache_dir):
    with running_engines(cache_dir, {"ar": dict(mode="ar", prefill_chunk_tokens=PREFILL_CHUNK), **SPEC_ENGINES}) as started:
        yield started


@pytest.fixture(scope="module")
def ar_outputs(engines):
    return {(i, j): run(engines["ar"], prompt, **params)[0]
            for i, prompt in enumerate(PROMPTS) for j, params in enumerate(PARAM_SETS)}


def test_processing_changes_ar_output(engines, ar_outputs):
    for (i, j), tokens in ar_outputs.items():
        assert BANNED not in tokens
        plain = {k: v for k, v in PARAM_SETS[j].items() if k not in PROCESSING}
        assert tokens != run(engines["ar"], PROMPTS[i], **plain)[0], f"processing had no effect on {i, j}"


@pytest.mark.parametrize("name", list(SPEC_ENGINES))
def test_spec_modes_equal_ar_with_processing(engines, ar_outputs, name):
    num_rollbacks = num_accepted = num_drafted = 0
    for (i, j), expected in ar_outputs.items():
        tokens, final = run(engines[name], PROMPTS[i], **PARAM_SETS[j])
        assert tokens == expected, f"{name} diverged from ar on prompt {i} with {PARAM_SETS[j]}"
        num_rollbacks += final.stats.num_rollbacks
        num_accepted += final.stats.num_accepted_tokens
        num_drafted += final.stats.num_draft_tokens
    if "wrong" in name:
        assert num_rollbacks > 0, "rollbacks must be exercised"
    if name == "sync-self":
        assert num_drafted > 0 and num_accepted >= 0.9 * num_drafted, (num_accepted, num_drafted)


def test_min_tokens_delays_a_stop_id_in_every_mode(engines):
    plain, _ = run(engines["ar"], PROMPTS[0], max_tokens=24, ignore_eos=True)
    stop_id = plain[1]
    stopped, final = run(engines["ar"], PROMPTS[0], max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    assert len(stopped) == plain.index(stop_id) + 1 <= 2 and final.finish_reason == "stop"
    params = dict(max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=8)
    expected, ar_final = run(engines["ar"], PROMPTS[0], **params)
    assert stop_id not in expected[:8] and len(expected) > 8
    for name in SPEC_ENGINES:
        tokens, final = run(engines[name], PROMPTS[0], **params)
        assert tokens == expected and final.finish_reason == ar_final.finish_reason, name


def test_async_rejection_sampling_with_processing(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "async", sampling_scheme="rejection"))
    try:
        num_drafted = 0
        for seed in range(6):      # at least 3; more while the draft (a race on a busy machine) has not drafted
            if seed >= 3 and num_drafted > 0:
                break
            tokens, final = run(sup, PROMPTS[seed % len(PROMPTS)], max_tokens=24, temperature=1.0, seed=seed,
                                stop_token_ids=[BANNED + 1], **PROCESSING)
            assert final.finish_reason in ("stop", "length") and tokens and BANNED not in tokens
            assert BANNED + 1 not in tokens[:PROCESSING["min_tokens"]]
            num_drafted += final.stats.num_draft_tokens
        assert num_drafted > 0
    finally:
        sup.shutdown()


def reference_prompt_logprobs(cache_dir: str, prompt: list[int]) -> torch.Tensor:
    """log_softmax of a plain full-prompt forward: row j scores prompt[j + 1]."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny-random/verify", cache_dir),
                                                 dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)


@pytest.mark.parametrize("name", ["ar", "async"])
def test_prompt_logprobs_equal_a_full_forward(engines, cache_dir, name):
    base = PROMPTS[1] + PROMPTS[2]
    assert len(base) > 2 * PREFILL_CHUNK, "the prompt must span several prefill chunks"
    for prompt in (base, base, base + [7, 8, 9]):            # the later ones would hit the prefix cache
        outputs = engines[name].generate(_request(prompt, num_prompt_logprobs=2), 60)
        assert [o.prompt_logprobs is not None for o in outputs[:-1]] == [True] + [False] * (len(outputs) - 2)
        got = outputs[0].prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        reference = reference_prompt_logprobs(cache_dir, prompt)                   # [n - 1, V]
        for j, entry in enumerate(got[1:]):
            assert entry.token_id == prompt[j + 1]
            assert entry.logprob == pytest.approx(float(reference[j, prompt[j + 1]]), abs=1e-5)
            top = reference[j].topk(2)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert outputs[-1].stats.num_cached_prompt_tokens == 0
    assert run(engines[name], base, max_tokens=2)[1].stats.num_cached_prompt_tokens > 0   # the cache still works


def _request(prompt, **params):
    from engine.messages import GenerationRequest, SamplingParams
    from tests.engine_helpers import _request_ids
    return GenerationRequest(next(_request_ids), list(prompt), SamplingParams(max_tokens=4, **params))
