"""Structured outputs on live engines (tiny float64 models, real workers, llguidance masks).

    valid      ar's constrained output matches its regex / choice / JSON schema when it stops
    identity   sync and async (the tiny draft, and an always-wrong draft that forces rollbacks inside
               the constrained region) emit exactly ar's tokens, greedy and seeded: the mask applies
               to the verify's choice and the grammar state follows every rollback
    acceptance the draft applies the same mask: with the verify model as its own draft, sync accepts
               (nearly) every drafted token under a grammar
"""
from __future__ import annotations

import json
import re

import pytest

from transformers import AutoTokenizer

from engine.messages import GrammarSpec
from engine.tiny_models import ensure_tiny_model
from tests.engine_helpers import running_engines, random_prompts, run

PROMPTS = random_prompts(2, seed=5)
REGEX = r"(yes|no), [a-z]{1,6}\."
CHOICES = ["alpha", "beta", "gamma delta"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 5}},
          "required": ["ok", "name"], "additionalProperties": False}
GRAMMARS = {
    "regex": GrammarSpec("regex", REGEX),
    "choice": GrammarSpec("choice", json.dumps(CHOICES)),
    "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
}
SAMPLINGS = [dict(), dict(temperature=0.9, seed=11)]
SPEC_ENGINES = {
    "sync-self": dict(mode="sync", draft="tiny-random/verify", num_speculative_tokens=3),
    "sync-wrong": dict(mode="sync", draft="tiny-random/wrong", num_speculative_tokens=3),
    "async": dict(mode="async"),
    "async-wrong": dict(mode="async", draft="tiny-random/wrong"),
    "async-batched": dict(mode="async", max_num_seqs=4, max_queue_size=16),
}
MAX_TOKENS = 160


def is_valid(kind: str, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    value = json.loads(text)
    return set(value) == {"ok", "name"} and isinstance(value["ok"], bool) and len(value["name"]) <= 5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def engines(cache_dir):
    with running_engines(cache_dir, {"ar": dict(mode="ar"), **SPEC_ENGINES}) as started:
        yield started


@pytest.fixture(scope="module")
def ar_outputs(engines):
    return {(kind, i, j): run(engines["ar"], prompt, max_tokens=MAX_TOKENS, grammar=spec, **sampling)
            for kind, spec in GRAMMARS.items() for i, prompt in enumerate(PROMPTS)
            for j, sampling in enumerate(SAMPLINGS)}


def test_ar_output_follows_the_grammar(ar_outputs, engines, cache_dir):
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model("tiny-random/verify", cache_dir))
    eos_ids = set(engines["ar"].eos_token_ids)
    num_stopped = 0
    for (kind, i, j), (tokens, final) in ar_outputs.items():
        if final.finish_reason != "stop":
            continue
        num_stopped += 1
        assert tokens[-1] in eos_ids, (kind, i, j, tokens)
        text = tokenizer.decode(tokens[:-1])
        assert is_valid(kind, text), f"{kind} output {text!r} does not follow the grammar"
    assert num_stopped >= len(ar_outputs) // 2, "most constrained outputs must complete within max_tokens"


@pytest.mark.parametrize("name", list(SPEC_ENGINES))
def test_spec_modes_equal_ar_under_a_grammar(engines, ar_outputs, name):
    num_rollbacks = num_accepted = num_drafted = 0
    for (kind, i, j), (expected, _) in ar_outputs.items():
        tokens, final = run(engines[name], PROMPTS[i], max_tokens=MAX_TOKENS, grammar=GRAMMARS[kind], **SAMPLINGS[j])
        assert tokens == expected, f"{name} diverged from ar under the {kind} grammar (prompt {i}, {SAMPLINGS[j]})"
        num_rollbacks += final.stats.num_rollbacks
        num_accepted += final.stats.num_accepted_tokens
        num_drafted += final.stats.num_draft_tokens
    if name == "sync-wrong":
        assert num_rollbacks > 0, "rollbacks inside the constrained region must be exercised"
    if name == "sync-self":
        assert num_drafted > 0 and num_accepted >= 0.9 * num_drafted, (num_accepted, num_drafted)


def test_async_batched_requests_under_grammars_together_each_equal_ar(engines, ar_outputs):
    """Every grammar request at once into async's batch (engine/async_batch.py): the draft's rows
    and the verify's each follow their own grammar state, rollbacks included."""
    from engine.messages import GenerationRequest, SamplingParams
    from tests.engine_helpers import wait_until
    sup, outputs = engines["async-batched"], {}
    for n, ((kind, i, j), _) in enumerate(ar_outputs.items()):
        outputs[kind, i, j] = []
        params = SamplingParams(max_tokens=MAX_TOKENS, grammar=GRAMMARS[kind], **SAMPLINGS[j])
        sup.submit(GenerationRequest(9000 + n, list(PROMPTS[i]), params), outputs[kind, i, j].append)
    assert wait_until(lambda: all(o and o[-1].finished for o in outputs.values()), 120)
    for key, (expected, _) in ar_outputs.items():
        assert [t for out in outputs[key] for t in out.token_ids] == expected, key
    assert max(size for outs in outputs.values() for size, n in
               enumerate(outs[-1].stats.num_passes_by_batch_size, 1) if n) > 1
