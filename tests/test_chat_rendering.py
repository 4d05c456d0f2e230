"""Unit tests: chat request -> prompt (Qwen2.5's template on the byte tokenizer), tool_choice
planning, and the FIM prompt. Expected prompts are written out by hand from Qwen's format."""
from __future__ import annotations

import json

import pytest

from server import protocol as P
from server.chat_rendering import ChatRenderer
from server.errors import OpenAIError
from server.fim import FimPrompter
from server.tool_choice import plan_tools
from server.tool_parsers import HermesToolParser
from tests.fakes import build_qwen_like_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
SYSTEM_DEFAULT = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(build_qwen_like_tokenizer(str(tmp_path_factory.mktemp("qwen"))))


def render(tokenizer, trusted: bool = False, **body) -> str:
    req = P.ChatCompletionRequest(**body)
    return ChatRenderer(tokenizer, trusted).render(req, plan_tools(req, HermesToolParser).tools)


def rejects(param: str, fn, *args, **kw) -> str:
    with pytest.raises(OpenAIError) as info:
        fn(*args, **kw)
    assert info.value.status == 400 and info.value.param == param, (info.value.param, info.value.message)
    return info.value.message


def test_tool_call_history_and_tool_results(tokenizer):
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    prompt = render(tokenizer, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "9C"}])
    assert prompt.startswith("<|im_start|>system\nYou are Qwen") and json.dumps(WEATHER_TOOL) in prompt
    assert prompt.endswith(
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n9C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"), prompt
    bad = [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]
    rejects("messages.1.tool_calls.0.function.arguments", render, tokenizer, messages=[
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": bad}])
    rejects("messages.0.tool_calls", render, tokenizer, messages=[{"role": "user", "content": "x", "tool_calls": calls}])
    # what the openai SDK echoes back from a response message: nulls are fine, a legacy function_call is not
    sdk_echo = {"role": "assistant", "content": None, "tool_calls": calls[:1], "refusal": None,
                "annotations": None, "audio": None, "function_call": None}
    assert render(tokenizer, messages=[{"role": "user", "content": "x"}, sdk_echo]).endswith(
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>assistant\n')
    rejects("messages.1.function_call", render, tokenizer, messages=[{"role": "user", "content": "x"},
            {**sdk_echo, "function_call": {"name": "get_weather", "arguments": "{}"}}])


def test_tool_choice_none_hides_tools(tokenizer):
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}
    assert "# Tools" in render(tokenizer, **body) and "# Tools" in render(tokenizer, tool_choice="auto", **body)
    assert render(tokenizer, tool_choice="none", **body) == SYSTEM_DEFAULT + (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_content_parts_joined_with_newline(tokenizer):
    prompt = render(tokenizer, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]}])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nline one\nline two<|im_end|>\n"
                      "<|im_start|>assistant\n")
    rejects("messages.0.content.1", render, tokenizer, messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_continue_final_message(tokenizer):
    msgs = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    prompt = render(tokenizer, messages=msgs, continue_final_message=True)
    assert prompt == SYSTEM_DEFAULT + "<|im_start|>user\nCount<|im_end|>\n<|im_start|>assistant\n1, 2,"
    assert render(tokenizer, messages=msgs, continue_final_message=True, add_generation_prompt=False) == prompt
    assert render(tokenizer, messages=msgs).endswith("1, 2,<|im_end|>\n<|im_start|>assistant\n")   # closed
    rejects("continue_final_message", render, tokenizer, messages=msgs, continue_final_message=True,
            add_generation_prompt=True)
    rejects("continue_final_message", render, tokenizer, messages=msgs[:1], continue_final_message=True)
    rejects("continue_final_message", render, tokenizer, continue_final_message=True,
            messages=[msgs[0], {"role": "assistant", "content": ""}])


def test_request_chat_template_and_kwargs(tokenizer):
    template = "{{ greeting }}{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template,
            "chat_template_kwargs": {"greeting": "Hello "}}
    assert render(tokenizer, trusted=True, **body) == "Hello [user:hi]"
    assert "not accept" in rejects("chat_template", render, tokenizer, **body)
    rejects("chat_template", render, tokenizer, trusted=True, messages=body["messages"], chat_template="{% if %}")
    # kwargs reach the tokenizer's own template too; they may not override apply_chat_template's arguments
    assert render(tokenizer, trusted=True, messages=body["messages"], chat_template="{{ x }}",
                  chat_template_kwargs={"x": 7}) == "7"
    rejects("chat_template_kwargs", render, tokenizer, messages=body["messages"],
            chat_template_kwargs={"tokenize": True})
    rejects("messages", render, tokenizer, messages=[])


def test_plan_tools():
    def plan(**body):
        return plan_tools(P.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **body), HermesToolParser)
    assert plan().parser_cls is None and plan(tool_choice="none").tools is None
    auto = plan(tools=[WEATHER_TOOL])
    assert auto.grammar is None and auto.tools[0]["function"]["name"] == "get_weather"
    assert isinstance(auto.new_parser(), HermesToolParser) and auto.new_parser() is not auto.new_parser()
    none = plan(tools=[WEATHER_TOOL], tool_choice="none")
    assert (none.tools, none.grammar, none.new_parser()) == (None, None, None)
    required = plan(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    assert required.grammar.kind == "lark" and "get_time" in required.grammar.value and "call)*" in required.grammar.value
    assert "call)*" not in plan(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                                parallel_tool_calls=False).grammar.value
    assert plan(tools=[WEATHER_TOOL], parallel_tool_calls=False).new_parser().is_parallel is False
    named = plan(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in named.grammar.value and "get_weather" not in named.grammar.value
    rejects("tool_choice", plan, tool_choice="required")
    rejects("tool_choice", plan, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})
    rejects("tools", plan, tools=[WEATHER_TOOL, WEATHER_TOOL])
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}
    rejects("tools", plan, tools=[bad_schema], tool_choice="required")


def test_fim_prompt(tokenizer, byte_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast
    fim = FimPrompter(tokenizer)
    assert fim.is_supported and fim.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    ids = fim.prompt_ids(tokenizer.encode("def f(", add_special_tokens=False), "):\n    pass")
    assert tokenizer.decode(ids) == "<|fim_prefix|>def f(<|fim_suffix|>):\n    pass<|fim_middle|>"
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|fim_prefix|>") and ids[-1] == 261
    assert fim.prompt_ids([], "") == [259, 260, 261]      # an empty file: still a FIM prompt
    plain = FimPrompter(PreTrainedTokenizerFast.from_pretrained(byte_tokenizer_dir))
    assert not plain.is_supported
    assert "<|fim_prefix|>" in rejects("suffix", plain.prompt_ids, [65], "x")
