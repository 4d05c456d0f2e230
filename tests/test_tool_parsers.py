"""Unit tests: the Hermes (Qwen2.5) tool-call parser, whole and streamed, and the tool_choice
grammars it builds, checked with llguidance's own matcher on the byte tokenizer."""
from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from server.tool_parsers import TOOL_PARSERS, HermesToolParser, get_tool_parser

WEATHER = {"name": "get_weather", "description": "Weather {in} a \"city\"",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                            "unit": {"enum": ["C", "F"]}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                           "required": ["zone"]}}


def call_text(name: str, arguments: dict) -> str:
    """A call as Qwen2.5 writes it."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}\n</tool_call>'


TWO_CALLS = ("Let me check.\n" + call_text("get_weather", {"city": "Paris"}) + "\n"
             + call_text("get_time", {"zone": "CET"}) + "\n")
TEXTS = [
    TWO_CALLS,
    call_text("get_weather", {"city": "Zürich 你好"}),
    "No tools needed. <tool_ is not a tag < tool_call>\n\n",
    "a <tool_call>{bad json}</tool_call> b " + call_text("get_time", {"zone": "UTC"}) + " after",
    "text then an unclosed call " + call_text("get_time", {"zone": "UTC"})[:-len("</tool_call>")],
    "cut off: <tool_call>\n{\"name\": \"get_wea",
    "<tool_call>[1, 2]</tool_call><tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>",
]


def parse_whole(text: str, **kw) -> tuple:
    content, calls = HermesToolParser(**kw).extract_tool_calls(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def parse_streamed(pieces: list[str]) -> tuple:
    parser, content, calls = HermesToolParser(), [], []
    for i, piece in enumerate(pieces):
        delta = parser.stream_delta(piece, is_last=i == len(pieces) - 1)
        content.append(delta.get("content", ""))
        calls += delta.get("tool_calls", [])
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    text = "".join(content)
    return (text or None) if calls else text, [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                                for c in calls]


def test_registry():
    assert get_tool_parser("hermes") is HermesToolParser and TOOL_PARSERS["hermes"] is HermesToolParser
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


def test_complete_output():
    assert parse_whole(TWO_CALLS) == ("Let me check.", [("get_weather", {"city": "Paris"}),
                                                        ("get_time", {"zone": "CET"})])
    assert parse_whole(TEXTS[1]) == (None, [("get_weather", {"city": "Zürich 你好"})])
    assert parse_whole(TEXTS[2]) == (TEXTS[2], [])          # no call: the text exactly, whitespace too
    # a block that is not a call stays content, verbatim; the good one is still a call
    assert parse_whole(TEXTS[3]) == ("a <tool_call>{bad json}</tool_call> b after", [("get_time", {"zone": "UTC"})])
    assert parse_whole(TEXTS[4]) == ("text then an unclosed call", [("get_time", {"zone": "UTC"})])
    assert parse_whole(TEXTS[5]) == (TEXTS[5], [])          # a call cut by max_tokens is content
    assert parse_whole(TEXTS[6]) == (TEXTS[6], [])          # JSON, but not {"name", "arguments": {}}
    assert parse_whole(TWO_CALLS, is_parallel=False) == ("Let me check.", [("get_weather", {"city": "Paris"})])


def test_calls_carry_ids_and_json_arguments():
    parser = HermesToolParser()
    _, calls = parser.extract_tool_calls(TWO_CALLS)
    assert len({c.id for c in calls}) == 2 and parser.tool_calls == calls
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    assert HermesToolParser().finish_reason("stop") == "stop"


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_split_anywhere_equals_whole(text):
    whole = parse_whole(text)
    assert parse_streamed(list(text)) == whole                   # one character at a time
    for i in range(len(text) + 1):                               # every single split point
        assert parse_streamed([text[:i], text[i:]]) == whole, i


def test_streaming_holds_back_an_open_call():
    parser = HermesToolParser()
    assert parser.stream_delta("Sure. <tool", is_last=False) == {"content": "Sure."}
    assert parser.stream_delta('_call>\n{"name": "get_time", ', is_last=False) == {}
    delta = parser.stream_delta('"arguments": {"zone": "CET"}}\n</tool_call>', is_last=False)
    assert list(delta) == ["tool_calls"]
    assert delta["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone": "CET"}'}
    assert parser.stream_delta("\n", is_last=True) == {}
    # a prefix of the tag that never becomes it is released as content
    parser = HermesToolParser()
    assert parser.stream_delta("x <tool_", is_last=False) == {"content": "x"}
    assert parser.stream_delta("box", is_last=False) == {"content": " <tool_box"}


# ---- tool_choice grammars (llguidance) ---------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(byte_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast.from_pretrained(byte_tokenizer_dir)
    return hf, llguidance.hf.from_tokenizer(hf)


def accepts(tokenizers, grammar: str, text: str) -> bool:
    hf, ll = tokenizers
    matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("lark", grammar))
    assert not matcher.is_error(), matcher.get_error()
    ids = hf.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_named_function_grammar(tokenizers):
    grammar = HermesToolParser.tool_call_grammar([WEATHER], allow_multiple=False)
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar)) == ""
    good = call_text("get_weather", {"city": "Paris", "unit": "C"})
    assert accepts(tokenizers, grammar, good)
    assert parse_whole(good)[1] == [("get_weather", {"city": "Paris", "unit": "C"})]   # it parses back
    assert not accepts(tokenizers, grammar, call_text("get_time", {"zone": "CET"}))     # another function
    assert not accepts(tokenizers, grammar, call_text("get_weather", {"unit": "C"}))    # required arg missing
    assert not accepts(tokenizers, grammar, call_text("get_weather", {"city": "P", "x": 1}))   # extra arg
    assert not accepts(tokenizers, grammar, good + "\n" + good)                         # one call only
    assert not accepts(tokenizers, grammar, "Sure! " + good)                            # no text first
    assert not accepts(tokenizers, grammar, good[:-1])                                  # must be complete
    # JSON written the way Qwen's template writes history calls (", " and ": "), nothing looser
    compact = good.replace(", ", ",").replace(": ", ":")
    assert parse_whole(compact)[1] == parse_whole(good)[1] and not accepts(tokenizers, grammar, compact)
    assert not accepts(tokenizers, grammar, good.replace('{"name"', '{ "name"'))


def test_required_grammar_allows_several_calls_of_any_tool(tokenizers):
    grammar = HermesToolParser.tool_call_grammar([WEATHER, TIME], allow_multiple=True)
    both = call_text("get_weather", {"city": "Paris"}) + "\n" + call_text("get_time", {"zone": "CET"})
    assert accepts(tokenizers, grammar, both)
    assert accepts(tokenizers, grammar, call_text("get_time", {"zone": "CET"}))
    assert not accepts(tokenizers, grammar, "I will not call a tool.")
    assert not accepts(tokenizers, grammar, call_text("get_date", {}))
    single = HermesToolParser.tool_call_grammar([WEATHER, TIME], allow_multiple=False)
    assert not accepts(tokenizers, grammar.replace("get_time", "get_tim"), both)
    assert not accepts(tokenizers, single, both)


def test_grammar_keeps_schema_refs(tokenizers):
    """Pydantic-made parameters ($defs + $ref, as openai.pydantic_function_tool sends) still work."""
    fn = {"name": "add_user", "parameters": {
        "type": "object", "properties": {"user": {"$ref": "#/$defs/User"}}, "required": ["user"],
        "$defs": {"User": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}}}
    grammar = HermesToolParser.tool_call_grammar([fn], allow_multiple=False)
    assert accepts(tokenizers, grammar, call_text("add_user", {"user": {"age": 3}}))
    assert not accepts(tokenizers, grammar, call_text("add_user", {"user": {"age": "three"}}))


def test_grammar_forces_added_tag_tokens(tmp_path):
    """Qwen2.5's <tool_call> / </tool_call> are added tokens: the grammar must ask for those tokens (the
    model's trained format), not the tag spelled out in bytes -- with the text literal, llguidance
    offered the added token but could not consume it, and the call ended right after the tag."""
    from transformers import PreTrainedTokenizerFast
    from tests.fakes import build_byte_tokenizer
    tags = (HermesToolParser.START, HermesToolParser.END)
    hf = PreTrainedTokenizerFast.from_pretrained(build_byte_tokenizer(str(tmp_path), extra_specials=tags))
    ll = llguidance.hf.from_tokenizer(hf)
    grammar = HermesToolParser.tool_call_grammar([WEATHER], allow_multiple=False,
                                                 special_tokens=frozenset(hf.get_added_vocab()))
    good = call_text("get_weather", {"city": "Paris"})
    as_tokens = hf.encode(good, add_special_tokens=False)                 # the tags become one token each
    assert as_tokens[0] == hf.convert_tokens_to_ids(tags[0]) and as_tokens[-1] == hf.convert_tokens_to_ids(tags[1])
    spelled = [b for t in as_tokens for b in (hf.encode(hf.decode([t]), add_special_tokens=False, split_special_tokens=True)
                                              if t in (as_tokens[0], as_tokens[-1]) else [t])]
    assert len(spelled) > len(as_tokens)
    for ids, expected in ((as_tokens, True), (spelled, False)):
        matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("lark", grammar))
        is_accepted = matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()
        assert is_accepted == expected, (ids, expected)
    assert parse_whole(hf.decode(as_tokens))[1] == [("get_weather", {"city": "Paris"})]
