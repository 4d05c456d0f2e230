"""`sync` and `async` emit exactly the tokens `ar` emits (tiny float64 models, live workers).

Covers many prompts, forced rollbacks (a perturbed draft and an always-wrong draft), stop tokens
mid-draft, max_tokens mid-draft, cancellation, back-to-back requests on the same workers, and
seeded (coupled) sampling.
"""
from __future__ import annotations

import time

import pytest

from engine.messages import GenerationRequest, SamplingParams
from tests.engine_helpers import running_engines, random_prompts, run

PROMPTS = random_prompts(10)
MAX_TOKENS = 48
SPEC_ENGINES = {
    "sync": dict(mode="sync"),
    "sync-wrong-k2": dict(mode="sync", draft="tiny-random/wrong", num_speculative_tokens=2),
    "async": dict(mode="async"),
    "async-wrong": dict(mode="async", draft="tiny-random/wrong"),
    "async-lead1": dict(mode="async", max_draft_lead=1, max_verify_tokens=1),
    "async-plain": dict(mode="async", draft_lookup_ngram=0, verify_lookup_ngram=0),   # AMUSD alone
}
# prompts of 64+ new tokens prefill on prefill_cores (here: the draft's core stands in as core 0) and
# the verify publishes the request only after that prefill (engine/async_decode.py)
WIDE_PREFILL_ENGINES = {"async-wide-prefill": dict(mode="async", prefill_cores="0")}
LONG_PROMPTS = [[(7 * i + 3 * s) % 256 for i in range(70 + 40 * s)] for s in range(3)]
WRONG_DRAFTS = ("sync-wrong-k2", "async-wrong")
USES_GUESSES = ("async", "async-wrong", "async-lead1")      # verify_lookup_ngram on (the default)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    with running_engines(cache, {"ar": dict(mode="ar"), **SPEC_ENGINES, **WIDE_PREFILL_ENGINES}) as started:
        yield started


@pytest.fixture(scope="module")
def ar_results(engines):
    return [run(engines["ar"], p, max_tokens=MAX_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def ar_outputs(ar_results):
    return [tokens for tokens, _ in ar_results]


@pytest.mark.parametrize("name", list(SPEC_ENGINES))
def test_greedy_outputs_equal_ar(engines, ar_results, name):
    num_rollbacks = num_accepted = num_drafted = num_guessed = num_guesses_accepted = 0
    for prompt, (expected, ar_final) in zip(PROMPTS, ar_results):
        tokens, final = run(engines[name], prompt, max_tokens=MAX_TOKENS)
        assert tokens == expected, f"{name} diverged from ar on prompt {prompt[:8]}..."
        assert final.finish_reason == ar_final.finish_reason
        num_rollbacks += final.stats.num_rollbacks
        num_accepted += final.stats.num_accepted_tokens
        num_drafted += final.stats.num_draft_tokens
        num_guessed += final.stats.num_lookup_tokens
        num_guesses_accepted += final.stats.num_lookup_accepted
    assert num_rollbacks > 0, "the test must exercise rollbacks"
    assert num_drafted > num_accepted, "some draft tokens must be checked and rejected"
    assert num_accepted > 0 or name in WRONG_DRAFTS, "the draft's tokens must be accepted too"
    if name in USES_GUESSES:
        # Proposed, not necessarily accepted: the random tiny models rarely repeat themselves (2-3
        # guesses kept per 480 tokens), too rare to assert without flakes.
        assert num_guessed > num_guesses_accepted, "the verify's n-gram guesses must be proposed"
    if name == "async-plain":
        assert num_guessed == 0
    if name == "sync":
        assert num_accepted > 0.3 * MAX_TOKENS * len(PROMPTS), "the perturbed draft should be accepted often"
    if name == "async":   # how far the draft gets ahead depends on timing: only ask that accepts happen
        assert num_accepted > 0, "the async accept path must be exercised"


@pytest.mark.parametrize("name", ["sync", "async", "async-wrong", "async-plain"])
@pytest.mark.parametrize("stop_index", [0, 3, 17])
def test_stop_token_mid_draft(engines, ar_outputs, name, stop_index):
    expected = ar_outputs[1]
    stop_token = expected[stop_index]
    cut = expected.index(stop_token) + 1
    tokens, final = run(engines[name], PROMPTS[1], max_tokens=MAX_TOKENS, stop_token_ids=[stop_token])
    ar_tokens, ar_final = run(engines["ar"], PROMPTS[1], max_tokens=MAX_TOKENS, stop_token_ids=[stop_token])
    assert tokens == ar_tokens == expected[:cut]
    assert final.finish_reason == ar_final.finish_reason == "stop"


@pytest.mark.parametrize("name", ["sync", "async", "async-wrong"])
@pytest.mark.parametrize("max_tokens", [1, 2, 5, 13])
def test_max_tokens_mid_draft(engines, ar_outputs, name, max_tokens):
    tokens, final = run(engines[name], PROMPTS[2], max_tokens=max_tokens)
    assert len(ar_outputs[2]) == MAX_TOKENS, "pick a prompt whose ar output does not hit EOS"
    assert tokens == ar_outputs[2][:max_tokens]
    assert final.finish_reason == "length"
    assert final.stats.num_generated_tokens == max_tokens


@pytest.mark.parametrize("name", ["sync", "async", "async-plain", "async-wrong"])
def test_coupled_sampling_equals_ar(engines, name):
    num_drafted = num_accepted = num_rollbacks = 0
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 20, 0.9), (1.0, 0, 0.5)]:
        for seed in (1, 2, 3):
            params = dict(max_tokens=32, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
            expected, _ = run(engines["ar"], PROMPTS[seed], **params)
            tokens, final = run(engines[name], PROMPTS[seed], **params)
            assert tokens == expected, f"{name} diverged from ar with {params}"
            num_drafted += final.stats.num_draft_tokens
            num_accepted += final.stats.num_accepted_tokens
            num_rollbacks += final.stats.num_rollbacks
            other, _ = run(engines["ar"], PROMPTS[seed], **{**params, "seed": 99})
            assert other != expected, f"the same prompt under another seed gave the same sample ({params})"
    # Over the 9 sampled requests the draft's tokens were checked, some rejected (rolled back), some kept.
    assert num_drafted > num_accepted and num_rollbacks > 0, (num_drafted, num_accepted, num_rollbacks)
    assert num_accepted > 0 or name in WRONG_DRAFTS


@pytest.mark.parametrize("name", ["ar", "sync", "async"])
def test_cancel_then_next_request_is_correct(engines, ar_outputs, name):
    sup = engines[name]
    first = {}
    finished = []
    num_tokens = [0]

    def on_output(out):
        first.setdefault("t", time.monotonic())
        num_tokens[0] += len(out.token_ids)
        if out.finished:
            finished.append((time.monotonic(), out))

    sup.submit(GenerationRequest(900_000 + len(name), PROMPTS[0], SamplingParams(max_tokens=400)), on_output)
    deadline = time.monotonic() + 30
    while "t" not in first and time.monotonic() < deadline:
        time.sleep(0.005)
    cancel_time = time.monotonic()
    sup.cancel(900_000 + len(name))
    while not finished and time.monotonic() < deadline:
        time.sleep(0.005)
    assert finished, "cancelled request never finished"
    done_time, out = finished[0]
    assert out.finish_reason == "cancelled"
    assert num_tokens[0] < 400, "the request ran to the end: the cancel did not take effect"
    assert done_time - cancel_time < 10       # generous: a slow CPU; a missed cancel would take ~400 steps
    tokens, _ = run(sup, PROMPTS[3], max_tokens=MAX_TOKENS)      # back-to-back on the same workers
    assert tokens == ar_outputs[3]


def test_cancel_before_start(engines):
    sup = engines["async"]
    results = []
    sup.submit(GenerationRequest(800_001, PROMPTS[0], SamplingParams(max_tokens=200)), results.append)
    sup.submit(GenerationRequest(800_002, PROMPTS[0], SamplingParams(max_tokens=5)), results.append)
    sup.cancel(800_002)
    sup.cancel(800_001)
    deadline = time.monotonic() + 30
    while sum(o.finished for o in results) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    finals = {o.request_id: o.finish_reason for o in results if o.finished}
    assert finals == {800_001: "cancelled", 800_002: "cancelled"}


def test_async_stats_are_consistent(engines):
    _, final = run(engines["async"], PROMPTS[4], max_tokens=MAX_TOKENS, ignore_eos=True)
    stats = final.stats
    assert stats.num_generated_tokens == MAX_TOKENS
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_lookup_accepted <= stats.num_lookup_tokens
    # Every verify step commits its accepted proposals + one token, except that max_tokens may cut
    # the last step's extra token.
    num_committable = stats.num_verify_steps + stats.num_accepted_tokens + stats.num_lookup_accepted
    assert num_committable - 1 <= stats.num_generated_tokens <= num_committable
    assert 0 < stats.draft_busy_s and 0 < stats.verify_busy_s
    assert stats.num_passes_by_batch_size == [stats.num_verify_steps]      # one sequence in every pass


def test_a_long_prompt_published_after_its_wide_prefill_still_equals_ar(engines):
    num_accepted = 0
    for prompt in LONG_PROMPTS + PROMPTS[:3]:
        expected, _ = run(engines["ar"], prompt, max_tokens=MAX_TOKENS)
        tokens, final = run(engines["async-wide-prefill"], prompt, max_tokens=MAX_TOKENS)
        assert tokens == expected, f"diverged from ar on a {len(prompt)}-token prompt"
        num_accepted += final.stats.num_accepted_tokens
    assert num_accepted > 0, "the draft must still draft after a late start"
