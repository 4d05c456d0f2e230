"""Structured outputs and forced tool calls through the official openai client, on the real server.

The live tiny server (configs/tiny.yaml: async speculation, random weights) cannot answer sensibly,
so these tests show what the grammar guarantees, not what the model knows: the output is valid for
the schema / the tool's parameters, parsed by the SDK or by the server's tool parser.
"""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"], "additionalProperties": False}}}
CLOCK_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


class Answer(BaseModel):
    is_ok: bool
    word: str = Field(max_length=5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def test_parse_returns_a_pydantic_object(client, server):
    num_parsed = 0
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=server.model, messages=[{"role": "user", "content": f"Answer in JSON, please ({seed})"}],
            response_format=Answer, max_tokens=200, temperature=0.7, seed=seed)
        choice = completion.choices[0]
        if choice.finish_reason == "length":   # a random model may pad JSON whitespace up to the bound
            continue
        assert isinstance(choice.message.parsed, Answer), choice.message.content
        num_parsed += 1
    assert num_parsed >= 1


def _check_weather_call(call) -> dict:
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "celsius"} and isinstance(arguments["celsius"], bool)
    assert len(arguments["city"]) <= 8
    return arguments


@pytest.mark.parametrize("is_streaming", [False, True])
def test_forced_tool_call_round_trip(client, server, is_streaming):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = dict(model=server.model, messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=named,
                   max_tokens=120, temperature=0)
    if is_streaming:
        with client.chat.completions.stream(**request) as stream:
            for _ in stream:
                pass
            completion = stream.get_final_completion()
    else:
        completion = client.chat.completions.create(**request)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content in (None, "")
    (call,) = choice.message.tool_calls
    _check_weather_call(call)
    # the tool's result goes back, and the model answers (tools hidden with tool_choice none)
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    final = client.chat.completions.create(model=server.model, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="none", max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert not final.choices[0].message.tool_calls


def test_required_tool_choice_calls_one_of_the_tools(client, server):
    completion = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Use a tool."}], tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice="required", max_tokens=150, temperature=0.8, seed=2)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        if call.function.name == "get_weather":
            _check_weather_call(call)
        else:
            assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_json_schema_on_completions_and_guided_choice(client, server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    out = client.completions.create(model=server.model, prompt="JSON:", max_tokens=120, temperature=0,
                                    extra_body={"response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "n", "schema": schema}}})
    if out.choices[0].finish_reason == "stop":
        value = json.loads(out.choices[0].text)
        assert set(value) == {"n"} and 0 <= value["n"] <= 99
    out = client.completions.create(model=server.model, prompt="Pick:", max_tokens=20, temperature=0.5, seed=1,
                                    extra_body={"guided_choice": ["red", "green", "blue"]})
    assert out.choices[0].text in ("red", "green", "blue") and out.choices[0].finish_reason == "stop"
