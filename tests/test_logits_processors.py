"""Logits processors (penalties, logit_bias, min_tokens, a stand-in grammar) at function level.

    reference        each processor against a plain-Python per-row reference (float64: exact)
    row vs alone     row i of a batched call == the processor on that position alone, bit for bit (float32)
    token chooser    a K-token verify / an n-gram draft forward choose per row what `ar` chooses there
    rejection        tokens the processing removes are never emitted, q and p are processed
Live engines (ar == sync == async with processors, prompt logprobs): tests/test_engine_processing.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.logits_processors import (LazyGrammarFactory, LogitBias, MinTokens, Penalties, apply_logits_processors,
                                      build_logits_processors, stop_token_ids, token_counts)
from engine.messages import GrammarSpec, SamplingParams
from engine.token_chooser import DRAFT_STREAM, VERIFY_STREAM, TokenChooser

VOCAB = 12
PROMPT = [1, 1, 4, 9]
OUTPUT = [3, 4, 3, 7, 40]
PROPOSAL = [3, 40, 8, 11, 4]      # repeats output tokens and itself; 40 >= VOCAB (a padded verify's id)
STOP_IDS = [0, 7]
ALL_ON = dict(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.6,
              logit_bias={2: 5.0, 3: -1.5, 40: 9.0}, min_tokens=6)   # 40 >= VOCAB: ignored


def reference_row(logits: list[float], context: list[int], params: SamplingParams, prompt: list[int],
                  stop_ids: list[int]) -> list[float]:
    """The documented processing of one row, in plain Python: context = output so far."""
    out = list(logits)
    if len(context) < params.min_tokens:
        for t in stop_ids:
            out[t] = -math.inf
    for t, bias in params.logit_bias.items():
        if t < len(out):
            out[t] += bias
    for t in range(len(out)):
        count = context.count(t)
        if (count or t in prompt) and params.repetition_penalty != 1.0:
            out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
        out[t] -= params.frequency_penalty * count
        out[t] -= params.presence_penalty * (count > 0)
    return out


def random_logits(num_rows: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return (torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3).to(dtype)


@pytest.mark.parametrize("params_kw", [
    dict(presence_penalty=0.7), dict(presence_penalty=-1.2), dict(frequency_penalty=0.3),
    dict(frequency_penalty=-2.0), dict(repetition_penalty=1.6), dict(repetition_penalty=0.5),
    dict(logit_bias={2: 5.0, 3: -100.0, 40: 9.0}), dict(min_tokens=6), ALL_ON,
])
def test_each_processor_matches_the_per_row_reference(params_kw):
    params = SamplingParams(max_tokens=20, **params_kw)
    processors = build_logits_processors(params, PROMPT, STOP_IDS)
    assert len(processors) >= 1
    logits = random_logits(len(PROPOSAL) + 1)
    got = apply_logits_processors(processors, logits, OUTPUT, PROPOSAL)
    for i in range(len(PROPOSAL) + 1):
        expected = reference_row(logits[i].tolist(), OUTPUT + PROPOSAL[:i], params, PROMPT, STOP_IDS)
        assert got[i].tolist() == expected, f"row {i} with {params_kw}"


def test_min_tokens_masks_exactly_the_rows_before_min_tokens():
    logits = random_logits(5)
    got = MinTokens(4, STOP_IDS)(logits, [5, 6], [1, 2, 3, 4])        # rows 0, 1: contexts of 2, 3 tokens
    assert torch.isneginf(got[:2, STOP_IDS]).all()
    assert torch.equal(got[2:], logits[2:]) and torch.equal(got[:2, 1:7], logits[:2, 1:7])
    # Only stop ids left (a finished grammar): the row keeps them rather than becoming all -inf.
    only_stop = torch.full((1, VOCAB), -torch.inf, dtype=torch.float64)
    only_stop[0, 7] = 1.0
    assert torch.equal(MinTokens(4, STOP_IDS)(only_stop, [], []), only_stop)


def test_logit_bias_ignores_ids_past_a_smaller_vocabulary():
    bias = LogitBias({2: 1.0, VOCAB + 3: 4.0})
    small = bias(random_logits(1)[:, :VOCAB // 2], [], [])
    wide = bias(torch.zeros(1, VOCAB + 4, dtype=torch.float64), [], [])
    assert small.shape == (1, VOCAB // 2) and wide[0, VOCAB + 3] == 4.0 and wide[0, 2] == 1.0


def test_token_counts_are_cumulative_per_row():
    counts = token_counts([3, 3, 50, 9], [3, 50, 7, 5, 9], num_rows=5, columns=torch.tensor([3, 5, 50]))
    assert counts.tolist() == [[2, 0, 1], [3, 0, 1], [3, 0, 2], [3, 0, 2], [3, 1, 2]]   # row i: output + proposal[:i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batched_row_is_bit_identical_to_the_row_alone(dtype):
    params = SamplingParams(max_tokens=20, **ALL_ON)
    processors = build_logits_processors(params, PROMPT, STOP_IDS, make_grammar=None)
    output, proposal = OUTPUT * 5, [3, 3, 4, 8, 11, 3, 2, 7]
    logits = random_logits(len(proposal) + 1, dtype, seed=3)
    batched = apply_logits_processors(processors, logits, output, proposal)
    assert batched.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for i in range(len(proposal) + 1):
        alone = apply_logits_processors(processors, logits[i:i + 1], output + proposal[:i], [])
        assert torch.equal(batched[i:i + 1], alone), f"row {i} differs from its position alone ({dtype})"


class AllowedAfter:
    """Stand-in grammar: after a context whose last token is even only odd tokens are allowed, else
    only even ones (and the stop ids once the context has 3 tokens). Context-dependent like a grammar."""

    def __init__(self, stop_ids):
        self.stop_ids = list(stop_ids)

    def __call__(self, logits, output_ids, proposal):
        rows = []
        for i in range(logits.shape[0]):
            context = list(output_ids) + list(proposal[:i])
            parity = 1 if (context and context[-1] % 2 == 0) else 0
            allowed = [t for t in range(logits.shape[1]) if t % 2 == parity]
            allowed += self.stop_ids if len(context) >= 3 else []
            row = torch.full_like(logits[i], -torch.inf)
            row[allowed] = logits[i, allowed]
            rows.append(row)
        return torch.stack(rows)


def make_stand_in_grammar(spec: GrammarSpec, stop_ids: list[int]) -> AllowedAfter:
    assert spec.kind == "regex"
    return AllowedAfter(stop_ids)


def test_the_grammar_factory_is_wired_first_and_gets_the_stop_ids():
    params = SamplingParams(grammar=GrammarSpec("regex", "x"), logit_bias={1: 3.0}, stop_token_ids=[5], ignore_eos=True,
                            presence_penalty=0.5, min_tokens=2)
    stop_ids = stop_token_ids(params, eos_token_ids=[0])
    assert stop_ids == {5}
    processors = build_logits_processors(params, PROMPT, stop_ids, make_stand_in_grammar)
    assert isinstance(processors[0], AllowedAfter) and processors[0].stop_ids == [5]
    assert [type(p) for p in processors[1:]] == [MinTokens, LogitBias, Penalties]      # vLLM's order
    with pytest.raises(ValueError, match="grammar"):
        build_logits_processors(params, PROMPT, stop_ids, make_grammar=None)
    assert build_logits_processors(SamplingParams(), PROMPT, stop_ids) == []


def test_lazy_grammar_factory_builds_once(monkeypatch, tmp_path):
    import sys
    import types
    made = []

    class FakeFactory:
        def __init__(self, tokenizer_dir, vocab_size):
            made.append((tokenizer_dir, vocab_size))

        def __call__(self, spec, stop_ids):
            return AllowedAfter(stop_ids)

    monkeypatch.setitem(sys.modules, "engine.grammar", types.SimpleNamespace(GrammarFactory=FakeFactory))
    factory = LazyGrammarFactory(str(tmp_path), 300)
    assert made == []
    factory(GrammarSpec("json_object"), [1])
    factory(GrammarSpec("json_object"), [2])
    assert made == [(str(tmp_path), 300)]


CHOOSER_PARAMS = [
    dict(temperature=0.0, **ALL_ON),
    dict(temperature=0.9, top_k=6, seed=5, **ALL_ON),
    dict(temperature=1.2, top_p=0.8, seed=6, presence_penalty=1.5, grammar=GrammarSpec("regex", "x")),
]


@pytest.mark.parametrize("params_kw", CHOOSER_PARAMS)
def test_verify_rows_and_draft_guess_rows_choose_what_ar_chooses_alone(params_kw):
    """ar scores one position at a time with the full context; a K-token verify and a draft forward
    with n-gram guesses score K+1 at once: every row must pick the token ar picks there."""
    params = SamplingParams(max_tokens=20, **params_kw)
    stop_ids = stop_token_ids(params, [0])
    make = lambda: build_logits_processors(params, PROMPT, stop_ids, make_stand_in_grammar)   # noqa: E731
    logits = random_logits(6, seed=8)
    ar = TokenChooser(params, "coupled", VERIFY_STREAM, make())
    ar_tokens = []
    for i in range(6):                      # ar: row i with context OUTPUT + ar_tokens[:i]
        ar_tokens += ar.draft(logits[i:i + 1], OUTPUT + ar_tokens)[0].tolist()
    verify = TokenChooser(params, "coupled", VERIFY_STREAM, make())
    num_accepted, committed = verify.verify(logits, OUTPUT, ar_tokens[:5])
    assert (num_accepted, committed) == (5, ar_tokens)
    wrong = ar_tokens[:2] + [(ar_tokens[2] + 2) % VOCAB] + ar_tokens[3:5]
    assert verify.verify(logits, OUTPUT, wrong) == (2, ar_tokens[:3])
    draft = TokenChooser(params, "coupled", DRAFT_STREAM, make())
    assert draft.draft(logits, OUTPUT, ar_tokens[:5])[0].tolist() == ar_tokens
    # The processing matters here: without it ar picks other tokens.
    plain = TokenChooser(params, "coupled", VERIFY_STREAM)
    assert [plain.draft(logits[i:i + 1], OUTPUT + ar_tokens[:i])[0].item() for i in range(6)] != ar_tokens


def test_rejection_sampling_samples_the_processed_distribution():
    """min_tokens removes stop id 0 and a -100 bias removes token 2: neither is ever emitted, the q the
    draft publishes is processed (0 there), and the first token follows the processed target."""
    params_kw = dict(temperature=1.0, min_tokens=3, logit_bias={2: -100.0, 5: 2.0}, frequency_penalty=1.0)
    target = torch.tensor([3.0, 0.5, 2.5, 1.0, -1.0, 0.0, 0.2, -0.3, 0.0, 0.1, 0.4, -2.0], dtype=torch.float64)
    draft_logits = torch.flip(target, [0])
    expected_row = apply_logits_processors(
        build_logits_processors(SamplingParams(max_tokens=9, **params_kw), [], [0]), target.view(1, -1), [5], [])
    expected = torch.softmax(expected_row[0], 0)
    counts = torch.zeros(VOCAB)
    num_trials = 3000
    for trial in range(num_trials):
        params = SamplingParams(max_tokens=9, seed=trial, **params_kw)
        draft = TokenChooser(params, "rejection", DRAFT_STREAM, build_logits_processors(params, [], [0]))
        verify = TokenChooser(params, "rejection", VERIFY_STREAM, build_logits_processors(params, [], [0]))
        proposal, q = draft.draft(draft_logits.view(1, -1), [5])
        assert q[0, 0] == 0 and q[0, 2] == 0
        _, committed = verify.verify(target.expand(2, VOCAB), [5], proposal.tolist(), q)
        counts[committed[0]] += 1
    assert counts[0] == 0 and counts[2] == 0
    assert torch.allclose(counts / num_trials, expected.float(), atol=0.035), (counts / num_trials, expected)


# ---- the async draft loop: context of one-token steps and of n-gram guess rows ----------------

@pytest.mark.parametrize("params_kw", [dict(temperature=0.0, **ALL_ON),
                                       dict(temperature=0.9, seed=2, grammar=GrammarSpec("regex", "x"), **ALL_ON)])
def test_async_draft_loop_processes_each_row_with_its_own_context(tmp_path, monkeypatch, params_kw):
    """The draft runs alone (no commits) until max_len; its tokens must be what the draft model
    chooses one position at a time with the full context (a plain forward per token). An oracle
    n-gram lookup proposes that future (one guess wrong), so guess rows are exercised too."""
    import threading

    import engine.async_decode
    from engine.async_decode import Drafter
    from engine.messages import StartRequest
    from engine.models import ModelRunner, load_causal_lm, resolve_model_spec
    from engine.shared_state import Ctrl, SharedState, VerifySide
    from engine.token_channel import HostDraftChannel

    model = load_causal_lm(resolve_model_spec("tiny-random/draft", str(tmp_path))[0], None, "cpu", "float64")
    prompt, eos = [10, 20, 30, 40, 50], [256]
    params = SamplingParams(max_tokens=14, **params_kw)
    reference_chooser = TokenChooser(params, "coupled", VERIFY_STREAM, build_logits_processors(
        params, prompt, stop_token_ids(params, eos), make_stand_in_grammar))
    reference: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([prompt + reference]), use_cache=False).logits[0, -1:]
            reference += reference_chooser.draft(logits, reference)[0].tolist()
    assert reference[:4] != [256] * 4

    num_guess_calls = []

    def oracle_guesses(tokens, max_ngram, num_proposals, min_ngram=1):
        done = len(tokens) - len(prompt)
        guesses = reference[done:done + min(num_proposals, 3)]
        if len(guesses) == 3:
            guesses[2] = (guesses[2] + 1) % 256       # the third guess is wrong: a partial accept
        num_guess_calls.append(len(guesses))
        return guesses

    monkeypatch.setattr(engine.async_decode, "propose_from_ngrams", oracle_guesses)
    state = SharedState.create(64)
    try:
        drafter = Drafter(ModelRunner(model, "cpu"), state, HostDraftChannel(state), max_draft_lead=32,
                          max_model_len=64, wait_timeout_s=5, lookup_ngram=3, eos_token_ids=eos,
                          make_grammar=make_stand_in_grammar)
        side = VerifySide(state)
        side.start_request(1, prompt)
        thread = threading.Thread(target=drafter.run, args=(StartRequest(1, prompt, params),), daemon=True)
        thread.start()
        max_len = len(prompt) + params.max_tokens
        for _ in range(3000):
            if state.get(Ctrl.NUM_DRAFTED) >= max_len or not thread.is_alive():
                break
            thread.join(0.01)
        drafted = state.draft_tokens[len(prompt):state.get(Ctrl.NUM_DRAFTED)].tolist()
        num_forwards = state.get(Ctrl.DRAFT_NUM_FORWARDS)
        side.finish_request(1)
        thread.join(10)
    finally:
        state.close()
    assert drafted == reference
    assert sum(num_guess_calls) > 0 and num_forwards < len(reference), "guess rows must have been accepted"
