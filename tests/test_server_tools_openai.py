"""The official `openai` client against the real FastAPI app on the fake engine (scripted text):
tool-calling round trips (streaming and not), tool_choice constraints reaching the engine, and
fill-in-the-middle through client.completions.create(prompt=..., suffix=...)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.fakes import build_qwen_like_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is 18C in Paris."
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return build_qwen_like_tokenizer(str(tmp_path_factory.mktemp("qwen_like")))


def client_of(fs) -> openai.OpenAI:
    return openai.OpenAI(base_url=fs.base_url + "/v1", api_key="none", max_retries=0)


def prompt_text(fs) -> str:
    """The prompt the engine got last, as text (byte tokenizer: ids < 256 are bytes)."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(fs.supervisor.tokenizer_dir)
    return tok.decode(fs.supervisor.submitted[-1].prompt_token_ids)


def say(fs, text: str) -> None:
    fs.supervisor.text_ids = list(text.encode("utf-8"))


def test_tool_round_trip(fake_server, qwen_dir):
    with fake_server(tokenizer_dir=qwen_dir, max_model_len=4096, text=CALL_TEXT, delay_s=0.001) as fs:
        client = client_of(fs)
        first = client.chat.completions.create(model="fake", messages=QUESTION, tools=[WEATHER_TOOL])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert json.dumps(WEATHER_TOOL) in prompt_text(fs)                     # tools rendered
        assert fs.supervisor.submitted[-1].params.grammar is None             # auto: not constrained

        say(fs, ANSWER)   # the client runs the tool and sends the result back, as agent loops do
        messages = QUESTION + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
        final = client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER_TOOL])
        assert final.choices[0].message.content == ANSWER and final.choices[0].finish_reason == "stop"
        assert not final.choices[0].message.tool_calls
        assert prompt_text(fs).endswith(
            '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n")


def test_tool_round_trip_streaming(fake_server, qwen_dir):
    with fake_server(tokenizer_dir=qwen_dir, max_model_len=4096, text=CALL_TEXT + "\n" + CALL_TEXT.split("\n", 1)[1].replace(
            "Paris", "Oslo"), delay_s=0.001, tokens_per_step=3) as fs:
        client = client_of(fs)
        chunks = list(client.chat.completions.create(model="fake", messages=QUESTION, tools=[WEATHER_TOOL],
                                                     stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert content == "Checking." and "<tool" not in content
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
            (0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Oslo"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # the SDK's streaming helper accumulates the deltas into a message
        with client.chat.completions.stream(model="fake", messages=QUESTION, tools=[WEATHER_TOOL]) as stream:
            completion = stream.get_final_completion()
        message = completion.choices[0].message
        assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls] == ["Paris", "Oslo"]

        say(fs, ANSWER)
        messages = QUESTION + [message] + [{"role": "tool", "tool_call_id": c.id, "content": f"{i}C"}
                                           for i, c in enumerate(message.tool_calls)]
        chunks = list(client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER_TOOL],
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert "<tool_response>\n0C\n</tool_response>\n<tool_response>\n1C\n</tool_response>" in prompt_text(fs)


def test_tool_choice_reaches_the_engine(fake_server, qwen_dir):
    with fake_server(tokenizer_dir=qwen_dir, max_model_len=4096, text=CALL_TEXT.split("\n", 1)[1], delay_s=0.001) as fs:
        client = client_of(fs)
        for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = client.chat.completions.create(model="fake", messages=QUESTION, tools=[WEATHER_TOOL],
                                               tool_choice=tool_choice)
            assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
            grammar = fs.supervisor.submitted[-1].params.grammar
            assert grammar.kind == "lark" and '"const": "get_weather"' in grammar.value
        r = client.chat.completions.create(model="fake", messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="none")
        assert r.choices[0].message.content.startswith("<tool_call>") and not r.choices[0].message.tool_calls
        assert "# Tools" not in prompt_text(fs) and fs.supervisor.submitted[-1].params.grammar is None
        for bad, param in ((dict(tool_choice="required"), "tool_choice"),
                           (dict(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "x"}}),
                            "tool_choice"),
                           (dict(messages=QUESTION + [{"role": "assistant", "content": "It"}], extra_body={
                               "continue_final_message": True, "add_generation_prompt": True}), "continue_final_message")):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="fake", **{"messages": QUESTION, **bad})
            assert info.value.body["param"] == param


def test_continue_final_message_over_http(fake_server, qwen_dir):
    with fake_server(tokenizer_dir=qwen_dir, max_model_len=4096, text=" 3, 4", delay_s=0.001) as fs:
        r = httpx.post(fs.url("/v1/chat/completions"), json={
            "messages": QUESTION + [{"role": "assistant", "content": "1, 2,"}], "continue_final_message": True})
        assert r.status_code == 200, r.text
        assert prompt_text(fs).endswith("<|im_start|>assistant\n1, 2,")
        body = {"messages": QUESTION, "chat_template": "{% for m in messages %}<{{ m.content }}>{% endfor %}"}
        r = httpx.post(fs.url("/v1/chat/completions"), json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"   # not trusted by default
    with fake_server(tokenizer_dir=qwen_dir, text="ok", delay_s=0.001, trust_request_chat_template=True) as fs:
        assert httpx.post(fs.url("/v1/chat/completions"), json=body).status_code == 200
        assert prompt_text(fs) == "<Weather in Paris?>"


def test_fill_in_the_middle(fake_server, qwen_dir):
    with fake_server(tokenizer_dir=qwen_dir, max_model_len=4096, text="return a + b", delay_s=0.001) as fs:
        client = client_of(fs)
        r = client.completions.create(model="fake", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))",
                                      max_tokens=50)
        assert r.choices[0].text == "return a + b" and r.choices[0].finish_reason == "stop"
        request = fs.supervisor.submitted[-1]
        assert request.prompt_token_ids == [259, *b"def add(a, b):\n    ", 260, *b"\n\nprint(add(1, 2))", 261]
        assert 256 in request.params.stop_token_ids                   # <|endoftext|> ends the middle
        stream = client.completions.create(model="fake", prompt="x", suffix="y", max_tokens=50, stream=True)
        assert "".join(c.choices[0].text for c in stream) == "return a + b"
        assert fs.supervisor.submitted[-1].prompt_token_ids == [259, *b"x", 260, *b"y", 261]
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fake", prompt="x", suffix="y", echo=True)
        assert info.value.body["param"] == "suffix"
    with fake_server(delay_s=0.001) as fs:                         # the byte tokenizer has no FIM tokens
        with pytest.raises(openai.BadRequestError) as info:
            client_of(fs).completions.create(model="fake", prompt="def f(", suffix="):")
        assert info.value.body["param"] == "suffix" and "<|fim_prefix|>" in info.value.body["message"]


def test_tool_settings(capsys):
    from server.main import main
    from server.settings import load_settings
    assert main(["--tool-call-parser", "bogus"]) == 2
    assert "known: hermes" in capsys.readouterr().err
    settings = load_settings([])
    assert (settings.tool_call_parser, settings.trust_request_chat_template) == ("hermes", False)
    assert load_settings(["--trust-request-chat-template"]).trust_request_chat_template is True
