"""engine/grammar.py: llguidance token masks for structured outputs (issue 12, item 3).

On the tiny byte-level tokenizer (one token per byte, ids 256..258 = <|endoftext|>, <|im_start|>,
<|im_end|>), with no model forward: random logits stand in for a model, so any text that comes out
is what the mask alone allowed.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

from engine.grammar import GrammarFactory  # noqa: E402
from engine.grammar_spec import validate_grammar_spec  # noqa: E402
from engine.messages import GrammarSpec  # noqa: E402
from engine.tiny_models import TINY_PADDING_ROWS, ensure_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_SIZE = 259
EOS, IM_START, IM_END = 256, 257, 258
STOP_IDS = frozenset({EOS, IM_END})
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def _is_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 8
            and type(value["age"]) is int and 0 <= value["age"] <= 120
            and len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"})


def _is_tool_call(text: str) -> bool:
    body = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", text, re.S)
    return body is not None and _is_person(body.group(1))


SPECS = {
    "json_schema": (GrammarSpec("json_schema", json.dumps(PERSON)), _is_person),
    "json_object": (GrammarSpec("json_object"), lambda text: isinstance(json.loads(text), dict)),
    "regex": (GrammarSpec("regex", r"[a-z]{2,5}-\d{3}"), lambda text: re.fullmatch(r"[a-z]{2,5}-\d{3}", text)),
    "choice": (GrammarSpec("choice", '["red", "green", "blue"]'), lambda text: text in ("red", "green", "blue")),
    "lark": (GrammarSpec("lark", 'start: "<tool_call>\\n" %json' + json.dumps(PERSON) + ' "\\n</tool_call>"'),
             _is_tool_call),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("grammar-cache"))
    return {name: ensure_tiny_model(f"tiny-random/{name}", cache) for name in ("verify", "verify-padded")}


@pytest.fixture(scope="module")
def factory(tiny_dirs):
    return GrammarFactory(tiny_dirs["verify"], TOKENIZER_SIZE)


@pytest.fixture(scope="module")
def padded_factory(tiny_dirs):
    return GrammarFactory(tiny_dirs["verify-padded"], TOKENIZER_SIZE + TINY_PADDING_ROWS)


def _byte_id(factory: GrammarFactory, char: str) -> int:
    (token,) = factory.ll_tokenizer.tokenize_str(char)
    return token


def _text(factory: GrammarFactory, tokens: list[int]) -> str:
    return factory.ll_tokenizer.decode_str(tokens)


def _random_logits(generator: torch.Generator, bias: torch.Tensor) -> torch.Tensor:
    return torch.randn(1, bias.shape[0], generator=generator, dtype=torch.float64) + bias   # [1, V]


def _ending_bias(factory: GrammarFactory) -> torch.Tensor:
    """Random logits plus a push towards closing strings and objects, so a free JSON object ends;
    padded rows get the largest push of all (the mask must still keep them out)."""
    bias = torch.zeros(factory.vocab_size, dtype=torch.float64)
    bias[[_byte_id(factory, c) for c in '"}]'] + sorted(STOP_IDS)] = 2.5
    bias[TOKENIZER_SIZE:] = 10.0
    return bias


def _greedy(factory: GrammarFactory, spec: GrammarSpec, seed: int, max_steps: int = 400) -> list[int] | None:
    """mask, argmax, append until a stop id (returns the tokens before it) or max_steps (None)."""
    processor, generator, bias = factory(spec, STOP_IDS), torch.Generator().manual_seed(seed), _ending_bias(factory)
    tokens: list[int] = []
    for _ in range(max_steps):
        token = int(processor(_random_logits(generator, bias), tokens, []).argmax())
        if token in STOP_IDS:
            return tokens
        tokens.append(token)
    return None


def _allowed(masked: torch.Tensor) -> set[int]:
    return set(torch.nonzero(masked > float("-inf")).flatten().tolist())


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("padded", [False, True], ids=["vocab259", "padded"])
def test_greedy_decoding_under_the_mask_yields_valid_text(kind, padded, factory, padded_factory):
    chosen = padded_factory if padded else factory
    spec, is_valid = SPECS[kind]
    for seed in range(4):
        tokens = _greedy(chosen, spec, seed)
        assert tokens is not None, f"{kind} seed {seed}: no stop id within the step limit"
        assert all(t < TOKENIZER_SIZE for t in tokens)
        text = _text(chosen, tokens)
        assert is_valid(text), f"{kind} seed {seed}: {text!r}"


def _trajectory(factory: GrammarFactory, spec: GrammarSpec, seed: int) -> list[int]:
    tokens = _greedy(factory, spec, seed)
    assert tokens is not None and len(tokens) >= 12
    return tokens


def _alone(factory, spec, logits, output_ids, proposal) -> torch.Tensor:
    """Each row computed with a fresh processor and its whole context as output_ids."""
    return torch.cat([factory(spec, STOP_IDS)(logits[i:i + 1], list(output_ids) + list(proposal[:i]), [])
                      for i in range(logits.shape[0])])


def test_rows_of_a_proposal_equal_rows_computed_one_at_a_time(factory):
    spec = SPECS["json_schema"][0]
    tokens = _trajectory(factory, spec, seed=1)
    logits = torch.randn(7, factory.vocab_size, generator=torch.Generator().manual_seed(0))   # [7, V]
    processor = factory(spec, STOP_IDS)
    for start in (0, 3, len(tokens) - 6):
        output_ids, proposal = tokens[:start], tokens[start:start + 6]
        assert torch.equal(processor(logits, output_ids, proposal), _alone(factory, spec, logits, output_ids, proposal))


def test_rows_after_a_rejected_proposal_token_allow_only_stop_ids(factory):
    spec = SPECS["json_schema"][0]
    tokens = _trajectory(factory, spec, seed=2)
    output_ids, bad = tokens[:5], _byte_id(factory, "#")           # '#' fits nowhere in this schema
    proposal = tokens[5:7] + [bad] + tokens[7:10]
    logits = torch.randn(len(proposal) + 1, factory.vocab_size, generator=torch.Generator().manual_seed(1))
    processor = factory(spec, STOP_IDS)
    masked = processor(logits, output_ids, proposal)                                  # [7, V]
    alone = _alone(factory, spec, logits[:3], output_ids, proposal)
    assert torch.equal(masked[:3], alone)                           # rows up to the one that rejects '#'
    assert bad not in _allowed(masked[2])
    assert all(_allowed(masked[i]) == STOP_IDS for i in range(3, 7))
    # the matcher was not left in an error state: a valid context afterwards is exact again
    assert not processor.matcher.is_error()
    output_ids, proposal = tokens[:6], tokens[6:9]
    assert torch.equal(processor(logits[:4], output_ids, proposal), _alone(factory, spec, logits[:4], output_ids, proposal))


class RefusingRollback:
    """An LLMatcher whose rollback always fails (as a limited rollback would): forces reset + replay."""

    def __init__(self, matcher):
        self.matcher = matcher

    def rollback(self, num_tokens: int) -> bool:
        return False

    def deep_copy(self):
        return RefusingRollback(self.matcher.deep_copy())

    def __getattr__(self, name):
        return getattr(self.matcher, name)


@pytest.mark.parametrize("rollback", ["llguidance", "reset_and_replay"])
def test_syncing_back_to_a_shorter_or_different_context_gives_fresh_masks(rollback, factory):
    """Contexts jump between two trajectories and back, cutting inside strings and numbers: every
    call must equal a fresh processor's, whatever the processor saw before."""
    spec = SPECS["json_schema"][0]
    trajectories = [_trajectory(factory, spec, seed) for seed in (3, 4)]
    processor = factory(spec, STOP_IDS)
    if rollback == "reset_and_replay":
        processor.compiled = RefusingRollback(processor.compiled)
        processor.matcher = processor.compiled.deep_copy()
    rng, generator = random.Random(0), torch.Generator().manual_seed(2)
    num_rollbacks, last_context = 0, []
    for _ in range(25):
        tokens = rng.choice(trajectories)
        end = rng.randint(1, len(tokens))
        start = rng.randint(max(0, end - 5), end)
        output_ids, proposal = tokens[:start], tokens[start:end]
        logits = torch.randn(len(proposal) + 1, factory.vocab_size, generator=generator)
        assert torch.equal(processor(logits, output_ids, proposal), _alone(factory, spec, logits, output_ids, proposal))
        num_rollbacks += output_ids[:len(last_context)] != last_context   # held context not a prefix
        last_context = tokens[:end]                                       # the proposal stays consumed
    assert num_rollbacks >= 5
    assert processor.num_replays == (num_rollbacks if rollback == "reset_and_replay" else 0)


def test_stop_ids_are_allowed_exactly_where_the_grammar_can_end(factory):
    a, b, c = (_byte_id(factory, ch) for ch in "abc")
    spec = GrammarSpec("regex", "a(bc)?")
    logits = torch.zeros(4, factory.vocab_size)
    masked = factory(spec, STOP_IDS)(logits, [], [a, b, c])
    assert [_allowed(row) for row in masked] == [{a}, {b} | STOP_IDS, {c}, STOP_IDS]
    # only the request's stop ids, mapped from llguidance's EOS (here: <|im_end|> but not <|endoftext|>)
    assert _allowed(factory(spec, frozenset({IM_END}))(logits[:1], [a], [])[0]) == {b, IM_END}
    # no stop ids at all (ignore_eos): the tokenizer's EOS still marks the end
    assert _allowed(factory(spec, frozenset())(logits[:1], [a, b, c], [])[0]) == {EOS}
    # a context the grammar rejects: never an all -inf row, only the stop ids
    assert _allowed(factory(spec, STOP_IDS)(logits[:2], [b], [a])[0]) == STOP_IDS


def test_padded_rows_and_chat_specials_are_always_masked(padded_factory):
    processor = padded_factory(GrammarSpec("regex", "(?s:.*)"), STOP_IDS)
    masked = processor(torch.zeros(2, padded_factory.vocab_size), [], [_byte_id(padded_factory, "x")])   # [2, V]
    for row in masked:
        allowed = _allowed(row)
        assert len(allowed) > 150                   # every byte that can start UTF-8 text
        assert max(allowed - STOP_IDS) < 256 and IM_START not in allowed
        assert STOP_IDS <= allowed


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
    (GrammarSpec("json_schema", "[1, 2]"), "must be a JSON object"),
    (GrammarSpec("json_schema", '{"type": "nope"}'), "nope"),
    (GrammarSpec("json_schema", '{"$ref": "#/missing"}'), "missing"),
    (GrammarSpec("regex", "a("), "regex"),
    (GrammarSpec("choice", "[]"), "non-empty JSON list"),
    (GrammarSpec("choice", '["a", 1]'), "list of strings"),
    (GrammarSpec("lark", "start: ("), "lark"),
    (GrammarSpec("xml", "<a/>"), "grammar kind"),
])
def test_invalid_specs_raise_value_error(spec, message, factory):
    with pytest.raises(ValueError, match=re.escape(message)):
        factory(spec, STOP_IDS)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_grammar_spec(spec)


def test_compiled_grammars_are_cached_least_recently_used_first(tiny_dirs):
    factory = GrammarFactory(tiny_dirs["verify"], TOKENIZER_SIZE, num_cached=2)
    specs = [GrammarSpec("regex", f"x{i}") for i in range(3)]
    first = factory.compile(specs[0])
    assert factory.compile(specs[0]) is first
    factory.compile(specs[1])
    factory.compile(specs[0])                     # now most recently used
    factory.compile(specs[2])                     # evicts specs[1]
    assert list(factory.compiled) == [specs[0], specs[2]]
    assert factory.compile(specs[0]) is first


def test_spec_validation_does_not_import_torch():
    """The frontend (which never imports torch) can pre-validate with engine.grammar_spec."""
    code = ("import sys; from engine.grammar_spec import validate_grammar_spec; "
            "from engine.messages import GrammarSpec; validate_grammar_spec(GrammarSpec('json_object')); "
            "assert 'torch' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
