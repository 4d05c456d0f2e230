"""Request fields against a FakeSupervisor: what is refused (400 naming the field), what is ignored
(only IGNORED_FIELDS), and what each field becomes in the SamplingParams the engine receives.
"""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from engine.messages import GrammarSpec, SamplingParams
from server import protocol as P
from tests.test_server_fake import assert_openai_error

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
COMPLETION = {"prompt": "x", "max_tokens": 3}
IGNORED_VALUES = {"user": "u-1", "safety_identifier": "s", "metadata": {"k": "v"}, "store": True,
                  "service_tier": "auto", "prompt_cache_key": "c", "cache_prompt": True,
                  "prediction": {"type": "content", "content": "abc"}, "priority": 3, "request_id": "r-1"}


def submitted(fs, path: str, body: dict) -> SamplingParams:
    resp = httpx.post(fs.url(path), json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return fs.supervisor.submitted[-1].params


def test_ignored_list_is_the_tested_list():
    assert set(IGNORED_VALUES) == set(P.IGNORED_FIELDS)


def test_every_ignored_field_is_accepted_and_changes_nothing(fake_server):
    with fake_server(default_temperature=0.0) as fs:
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            base = submitted(fs, path, body)
            for name, value in IGNORED_VALUES.items():
                assert submitted(fs, path, {**body, name: value}) == base, name
            assert submitted(fs, path, {**body, "functions": None, "logit_bias": None}) == base   # null = not set


@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_unknown_fields_are_400_naming_them(fake_server, path, body):
    with fake_server() as fs:
        for extra, param in (({"frobnicate": 1}, "frobnicate"), ({"best_of_all": 2}, "best_of_all"),
                             ({"functions": []}, "functions"),
                             ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
                             ({"response_format": {"json_object": True}}, "response_format.type"),
                             ({"response_format": {"type": "json_object", "strict": True}}, "response_format.strict"),
                             ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
                              "response_format.json_schema.schema"),
                             ({"response_format": {"type": "yaml"}}, "response_format.type"),
                             ({"structured_outputs": {"regex": "a+", "disable_any_whitespace": True}},
                              "structured_outputs.disable_any_whitespace")):
            err = assert_openai_error(httpx.post(fs.url(path), json={**body, **extra}), 400)
            assert err["param"] == param, (extra, err)
            assert param.split(".")[-1] in err["message"], err
        assert len(fs.supervisor.submitted) == 0


def test_two_constraints_or_a_bad_one_are_400(fake_server):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with fake_server() as fs:
        for extra, param in (({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
                             ({"guided_json": schema, "guided_choice": ["a"]}, "guided_choice"),
                             ({"structured_outputs": {"json": schema, "regex": "a"}}, "structured_outputs.regex"),
                             ({"guided_regex": "(ab"}, "guided_regex"),
                             ({"guided_json": {"type": "frobnicate"}}, "guided_json"),
                             ({"guided_json": "{not json"}, "guided_json"),
                             ({"guided_choice": []}, "guided_choice"),
                             ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
                             ({"response_format": {"type": "json_schema", "json_schema": {
                                 "name": "x", "schema": {"$ref": "#/nowhere"}}}},
                              "response_format.json_schema.schema")):
            for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
                err = assert_openai_error(httpx.post(fs.url(path), json={**body, **extra}), 400)
                assert err["param"] == param, (extra, err)
        assert len(fs.supervisor.submitted) == 0


def test_each_field_reaches_the_sampling_params(fake_server):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with fake_server(default_temperature=0.0) as fs:
        p = submitted(fs, "/v1/completions", {
            "prompt": "x", "n_predict": 7, "presence_penalty": 0.5, "frequency_penalty": -0.25,
            "repeat_penalty": 1.1, "logit_bias": {"65": 5, "66": -100}, "min_tokens": 2, "stop_token_ids": [33],
            "ignore_eos": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
        assert (p.max_tokens, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (7, 0.5, -0.25, 1.1)
        assert (p.logit_bias, p.min_tokens, p.stop_token_ids, p.ignore_eos) == ({65: 5.0, 66: -100.0}, 2, [33], True)
        assert p.grammar == GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))
        p = submitted(fs, "/v1/chat/completions", {**CHAT, "repetition_penalty": 1.2,
                                                   "response_format": {"type": "json_object"}})
        assert (p.repetition_penalty, p.grammar, p.max_tokens) == (1.2, GrammarSpec("json_object"), 3)
        assert submitted(fs, "/v1/chat/completions", {**CHAT, "response_format": {"type": "text"}}).grammar is None
        cases = [({"guided_choice": ["yes", "no"]}, GrammarSpec("choice", '["yes", "no"]')),
                 ({"guided_regex": "[0-9]+"}, GrammarSpec("regex", "[0-9]+")),
                 ({"structured_outputs": {"regex": "a|b"}}, GrammarSpec("regex", "a|b")),
                 ({"structured_outputs": {"json_object": True}}, GrammarSpec("json_object")),
                 ({"structured_outputs": {"json": json.dumps(schema)}},
                  GrammarSpec("json_schema", json.dumps(schema, separators=(",", ":")))),
                 ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, GrammarSpec("lark", 'start: "a" | "b"'))]
        for extra, spec in cases:
            assert submitted(fs, "/v1/completions", {**COMPLETION, **extra}).grammar == spec, extra
        gbnf = submitted(fs, "/v1/completions", {**COMPLETION, "guided_grammar": 'root ::= "yes" | "no"'}).grammar
        assert gbnf.kind == "lark" and "start" in gbnf.value and '"yes"' in gbnf.value
        # the chat endpoint: n_predict when no max_tokens; -1 = until the context is full
        body = {"messages": CHAT["messages"]}
        assert submitted(fs, "/v1/chat/completions", {**body, "n_predict": 5}).max_tokens == 5
        assert submitted(fs, "/v1/chat/completions", {**body, "n_predict": -1}).max_tokens > 100


def test_alias_conflicts_and_bad_token_ids_are_400(fake_server):
    with fake_server() as fs:
        for extra, param in (({"repetition_penalty": 1.1, "repeat_penalty": 1.2}, "repeat_penalty"),
                             ({"max_tokens": 3, "n_predict": 4}, "n_predict"),
                             ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"259": 1}}, "logit_bias"),
                             ({"logit_bias": {"65": 101}}, "logit_bias"), ({"stop_token_ids": [259]}, "stop_token_ids"),
                             ({"min_tokens": 4}, "min_tokens"), ({"presence_penalty": 2.5}, "presence_penalty"),
                             ({"repetition_penalty": 0}, "repetition_penalty"), ({"n": 0}, "n"), ({"n": 17}, "n")):
            err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={**COMPLETION, **extra}), 400)
            assert err["param"] == param, (extra, err)
        assert httpx.post(fs.url("/v1/completions"), json={**COMPLETION, "repetition_penalty": 1.1,
                                                           "repeat_penalty": 1.1}).status_code == 200


def test_stop_token_ids_include_stop_str_and_skip_special_tokens(fake_server):
    with fake_server(text="Hello, world", default_temperature=0.0) as fs:
        r = httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 20, "stop_token_ids": [44]}).json()
        choice = r["choices"][0]
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("Hello", "stop", 44)
        assert r["usage"]["completion_tokens"] == 6                 # the stop token counts, but is not shown
        r = httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 20, "stop_token_ids": [44],
                                                         "include_stop_str_in_output": True}).json()
        assert r["choices"][0]["text"] == "Hello,"
        for include, text in ((False, "Hello"), (True, "Hello, wo")):
            r = httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 20, "stop": ", wo",
                                                             "include_stop_str_in_output": include}).json()
            assert r["choices"][0]["text"] == text and r["choices"][0]["stop_reason"] == ", wo"
        fs.supervisor.text_ids = [72, 256, 105]                     # "H", <|endoftext|>, "i"
        for skip, text in ((True, "Hi"), (False, "H<|endoftext|>i")):
            r = httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 3,
                                                             "skip_special_tokens": skip}).json()
            assert r["choices"][0]["text"] == text


def _tokenizer_with_generation_config(src: str, dst, config: dict) -> str:
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return str(dst)


def test_generation_config_defaults_applied_and_overridden(fake_server, byte_tokenizer_dir, tmp_path):
    config = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True,
              "eos_token_id": [258, 256]}
    tok_dir = _tokenizer_with_generation_config(byte_tokenizer_dir, tmp_path / "tok", config)
    with fake_server(tokenizer_dir=tok_dir, default_temperature=0.0) as fs:
        p = submitted(fs, "/v1/completions", COMPLETION)
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.7, 0.8, 20, 0.0, 1.05)
        p = submitted(fs, "/v1/completions", {**COMPLETION, "temperature": 0, "top_k": -1, "repetition_penalty": 1})
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0, 0.8, 0, 1)   # per field, as vLLM
        card = httpx.get(fs.url("/v1/models")).json()["data"][0]
        assert card["sampling_defaults"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
                                             "repetition_penalty": 1.05}
    with fake_server(tokenizer_dir=tok_dir, default_temperature=0.0, generation_config="none") as fs:
        p = submitted(fs, "/v1/completions", COMPLETION)
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    with fake_server(default_temperature=0.0) as fs:     # no generation_config.json (the tiny models): greedy
        p = submitted(fs, "/v1/completions", COMPLETION)
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 1.0, 0, 1.0)
        assert httpx.get(fs.url("/v1/models")).json()["data"][0]["sampling_defaults"]["temperature"] == 0.0
