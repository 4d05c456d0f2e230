"""GrammarSpec -> llguidance grammar text, and its validation (no torch, no tokenizer).

The engine compiles a request's `GrammarSpec` (engine/messages.py) into a token mask in
engine/grammar.py; the frontend can call `validate_grammar_spec` first to answer a bad schema,
regex or grammar with a 400 instead of a failed request. Both go through `grammar_from_spec`,
so they accept exactly the same specs.

JSON (json_object, json_schema): whitespace between JSON tokens is free-form but bounded (one
optional newline, then at most JSON_MAX_INDENT spaces or tabs), so pretty-printed JSON is allowed
while a small model cannot loop on whitespace forever. A schema's own "x-guidance" options
(llguidance's JSON compile options) override this.
"""
from __future__ import annotations

import json

from llguidance import LLMatcher

from engine.messages import GrammarSpec

JSON_MAX_INDENT = 40
JSON_OPTIONS = {"whitespace_pattern": r"(\x0D?\x0A)?[\x20\x09]{0,%d}" % JSON_MAX_INDENT}
ANY_JSON_OBJECT = '{"type": "object"}'


def grammar_from_spec(spec: GrammarSpec) -> str:
    """The llguidance grammar (JSON text) of `spec`. Raises ValueError naming what is wrong.

    Only the spec's syntax is checked here; `validate_grammar_spec` also compiles the grammar.
    """
    if spec.kind == "json_object":
        return LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except ValueError as e:
            raise ValueError(f"json_schema: the schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"json_schema: the schema must be a JSON object, got {type(schema).__name__}")
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return LLMatcher.grammar_from_lark(_choice_lark(spec.value))
    if spec.kind == "lark":
        return LLMatcher.grammar_from_lark(spec.value)
    raise ValueError(f"grammar kind must be one of {', '.join(GrammarSpec.KINDS)}, got {spec.kind!r}")


def validate_grammar_spec(spec: GrammarSpec) -> str:
    """Compile `spec` without a tokenizer; return its grammar text or raise ValueError."""
    grammar = grammar_from_spec(spec)
    raise_if_invalid(spec, LLMatcher.validate_grammar(grammar))
    return grammar


def raise_if_invalid(spec: GrammarSpec, error: str) -> None:
    """Turn llguidance's error message ('' when fine) into a ValueError that names the spec's kind."""
    if error:
        raise ValueError(f"invalid {spec.kind}: {error.strip()}")


def _choice_lark(value: str) -> str:
    """A JSON list of strings -> a Lark rule matching exactly one of them."""
    try:
        choices = json.loads(value)
    except ValueError as e:
        raise ValueError(f"choice: the value must be a JSON list of strings ({e})") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choice: the value must be a non-empty JSON list of strings, got {value!r}")
    # JSON string literals are valid Lark string literals (same escapes).
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
