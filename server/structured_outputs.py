"""A request's structured-output constraint -> one GrammarSpec, checked here with llguidance.

Where a constraint can come from (at most one per request, else 400):

    response_format    {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}}
    structured_outputs vLLM: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    guided_json / guided_regex / guided_choice / guided_grammar     vLLM's older aliases

The grammar is compiled here once (llguidance is torch-free and fast) so that a bad schema, regex
or grammar is a 400 naming its parameter, never a worker error. GBNF grammars (llama.cpp's, what
vLLM's `guided_grammar` usually carries) are converted to llguidance's Lark syntax.
"""
from __future__ import annotations

import json
from typing import Any

from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from engine.grammar_spec import validate_grammar_spec
from engine.messages import GrammarSpec
from server.errors import OpenAIError

_RESPONSE_FORMAT_KEYS = {"type", "json_schema"}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
_STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text -> canonical JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise OpenAIError(f"{param}: the schema is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise OpenAIError(f"{param}: a JSON schema must be an object", param=param)
    return json.dumps(schema, separators=(",", ":"))


def _choice_text(choices: Any, param: str) -> str:
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise OpenAIError(f"{param} must be a non-empty list of non-empty strings", param=param)
    return json.dumps(choices)


def _lark_text(grammar: Any, param: str) -> str:
    if not isinstance(grammar, str) or not grammar.strip():
        raise OpenAIError(f"{param} must be a non-empty grammar (Lark or GBNF)", param=param)
    try:
        return any_to_lark(grammar)
    except (GbnfToLarkError, ValueError) as exc:
        raise OpenAIError(f"{param}: cannot parse the grammar: {exc}", param=param) from None


def _from_response_format(fmt: dict[str, Any]) -> tuple[str, GrammarSpec] | None:
    if "type" not in fmt:
        raise OpenAIError("response_format.type is required (text, json_object or json_schema)",
                          param="response_format.type")
    extra = sorted(set(fmt) - _RESPONSE_FORMAT_KEYS)
    if extra:
        raise OpenAIError(f"response_format: unknown field {extra[0]!r}", param=f"response_format.{extra[0]}")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", GrammarSpec("json_object")
    if kind != "json_schema":
        raise OpenAIError(f"response_format.type {kind!r} is not supported (text, json_object or json_schema)",
                          param="response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise OpenAIError("response_format.json_schema must be an object with a `schema`",
                          param="response_format.json_schema")
    extra = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if extra:
        raise OpenAIError(f"response_format.json_schema: unknown field {extra[0]!r}",
                          param=f"response_format.json_schema.{extra[0]}")
    if spec.get("schema") is None:
        raise OpenAIError("response_format.json_schema.schema is required",
                          param="response_format.json_schema.schema")
    param = "response_format.json_schema.schema"
    return param, GrammarSpec("json_schema", _schema_text(spec["schema"], param))


def _from_structured_outputs(so: dict[str, Any]) -> list[tuple[str, GrammarSpec]]:
    extra = sorted(set(so) - set(_STRUCTURED_OUTPUTS_KEYS))
    if extra:
        raise OpenAIError(f"structured_outputs.{extra[0]} is not supported (supported: "
                          f"{', '.join(_STRUCTURED_OUTPUTS_KEYS)})", param=f"structured_outputs.{extra[0]}")
    found = []
    for key in _STRUCTURED_OUTPUTS_KEYS:
        value, param = so.get(key), f"structured_outputs.{key}"
        if value is None or value is False:
            continue
        if key == "json":
            found.append((param, GrammarSpec("json_schema", _schema_text(value, param))))
        elif key == "regex":
            found.append((param, GrammarSpec("regex", value if isinstance(value, str) else "")))
        elif key == "choice":
            found.append((param, GrammarSpec("choice", _choice_text(value, param))))
        elif key == "grammar":
            found.append((param, GrammarSpec("lark", _lark_text(value, param))))
        else:
            found.append((param, GrammarSpec("json_object")))
    return found


def check_grammar(spec: GrammarSpec, param: str) -> None:
    """400 naming `param` unless the constraint compiles exactly as the workers will compile it."""
    if spec.kind == "regex" and not spec.value:
        raise OpenAIError(f"{param} must be a non-empty regular expression", param=param)
    try:
        validate_grammar_spec(spec)
    except ValueError as exc:
        raise OpenAIError(f"{param}: invalid constraint: {exc}", param=param) from None


def grammar_spec(req: Any) -> GrammarSpec | None:
    """The request's one structured-output constraint (checked), or None."""
    found: list[tuple[str, GrammarSpec]] = []
    if req.response_format is not None:
        found += [f for f in [_from_response_format(req.response_format)] if f is not None]
    if req.structured_outputs is not None:
        found += _from_structured_outputs(req.structured_outputs)
    if req.guided_json is not None:
        found.append(("guided_json", GrammarSpec("json_schema", _schema_text(req.guided_json, "guided_json"))))
    if req.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec("choice", _choice_text(req.guided_choice, "guided_choice"))))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("lark", _lark_text(req.guided_grammar, "guided_grammar"))))
    if len(found) > 1:
        raise OpenAIError(f"only one structured-output constraint per request; got {found[0][0]} and "
                          f"{found[1][0]}", param=found[1][0])
    if not found:
        return None
    param, spec = found[0]
    check_grammar(spec, param)
    return spec
