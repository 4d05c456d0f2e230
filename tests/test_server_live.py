"""Integration tests against the REAL server (subprocess, configs/tiny.yaml, real EngineSupervisor).

Driven with the official `openai` client and with raw httpx for SSE framing and error paths.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Say hi 👋"}]


def post(server, path, body, **kw):
    return httpx.post(server.url(path), json=body, timeout=kw.pop("timeout", 60), **kw)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "?":
        assert err["param"] == param, err
    return err


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_health_and_models(server):
    health = httpx.get(server.url("/health")).json()
    assert health["is_healthy"] and set(health["workers"]) == {"verify", "draft"}
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [server.model]


def test_server_builds_its_tiny_models_in_the_session_cache(server, session_cache_dir):
    assert f"verify model {session_cache_dir}/tiny-random/" in server.log(), "models came from another cache"


def test_openai_completion_non_stream(server):
    client = server.openai()
    r = client.completions.create(model=server.model, prompt="Hello", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 5 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.usage.model_extra["spec_decode"]
    assert {"num_draft_tokens", "num_accepted_tokens", "num_rollbacks"} <= set(spec)
    # greedy is deterministic, prompt as token ids gives the same text
    from engine.tiny_models import build_byte_tokenizer
    ids = build_byte_tokenizer().encode("Hello", add_special_tokens=False)
    again = client.completions.create(model=server.model, prompt=ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_openai_completion_stream_matches_non_stream(server):
    client = server.openai()
    full = client.completions.create(model=server.model, prompt="abc", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=server.model, prompt="abc", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_chat_non_stream_and_stream(server):
    client = server.openai()
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_completion_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sampling_with_temperature_and_seed(server):
    client = server.openai()
    kw = dict(model=server.model, prompt="xyz", max_tokens=20, temperature=1.0, top_p=0.95, seed=123,
              extra_body={"top_k": 50, "min_p": 0.01, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 20


def test_sse_framing_raw(server):
    body = {"model": server.model, "messages": CHAT, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] > 0


def test_stop_string(server):
    client = server.openai()
    base = client.completions.create(model=server.model, prompt="Hello", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next((base[i:i + 2] for i in range(3, len(base) - 2) if "\ufffd" not in base[i:i + 2]), None)
    if stop is None:
        pytest.skip("greedy output of the tiny model has no clean 2-char window")
    for stream in (False, True):
        r = client.completions.create(model=server.model, prompt="Hello", max_tokens=40, temperature=0,
                                      stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == base[:base.index(stop)]


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "warm"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "min_p": 2}, "min_p"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "logprobs": 50}, "num_logprobs"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),             # unknown fields are refused, never ignored
    ({"prompt": "x", "stop": ["a"] * 50}, "stop"),
    ({"prompt": [1, 2, 999999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),                  # longer than max_prompt_tokens
    ({"prompt": "x" * 2000, "max_tokens": 3000}, "max_tokens"),   # prompt + max_tokens > context
    ({"prompt": 123}, "?"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_completion_errors_are_400(server, body, param):
    assert_openai_error(post(server, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("body", [
    {"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": "hi"},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"json_schema": {"schema": {}}}},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "guided_regex": "a"},
    {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"100000": 1}},
])
def test_chat_errors_are_400(server, body):
    assert_openai_error(post(server, "/v1/chat/completions", body), 400)


def test_malformed_bodies_are_400_not_422_or_500(server):
    for content in (b"{not json", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}', b'"str"', b""):
        resp = httpx.post(server.url("/v1/completions"), content=content,
                          headers={"content-type": "application/json"}, timeout=30)
        assert_openai_error(resp, 400)
    assert_openai_error(httpx.post(server.url("/v1/completions"), content=b"prompt=x",
                                   headers={"content-type": "text/plain"}), 400)


def test_unknown_model_404_and_unknown_route(server):
    err = assert_openai_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(model="nope", messages=CHAT)
    assert_openai_error(httpx.get(server.url("/v1/nothing-here")), 404)


def test_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError):
        server.openai().completions.create(model=server.model, prompt="x", max_tokens=-1)


def test_disconnect_cancels_generation_and_next_request_starts_promptly(server):
    before = httpx.get(server.url("/metrics")).text
    body = {"model": server.model, "prompt": "long", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
    # non-streaming disconnect: the client gives up after 0.5 s
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {**body, "stream": False}, timeout=0.5)
    t0 = time.monotonic()
    r = post(server, "/v1/completions", {"model": server.model, "prompt": "next", "max_tokens": 4})
    assert r.status_code == 200 and time.monotonic() - t0 < 3.0      # 4000 tokens would take > 4 s
    deadline, after = time.monotonic() + 10, ""
    while time.monotonic() < deadline:
        after = httpx.get(server.url("/metrics")).text
        name = 'amusd:request_success_total{finished_reason="abort"}'
        if metric(after, name) - metric(before, name) >= 2:
            break
        time.sleep(0.1)
    assert metric(after, name) - metric(before, name) >= 2
    generated = metric(after, "amusd:generation_tokens_total") - metric(before, "amusd:generation_tokens_total")
    assert generated < 2 * 4000          # both long requests were stopped early


def test_metrics_after_traffic(server):
    server.openai().completions.create(model=server.model, prompt="metrics", max_tokens=8)
    text = httpx.get(server.url("/metrics")).text
    assert metric(text, "amusd:time_to_first_token_seconds_count") >= 1
    assert metric(text, "amusd:e2e_request_latency_seconds_count") >= 1
    assert metric(text, "amusd:request_queue_time_seconds_count") >= 1
    assert metric(text, "amusd:inter_token_latency_seconds_count") >= 1
    assert metric(text, "amusd:prompt_tokens_total") >= 7
    assert metric(text, "amusd:generation_tokens_total") >= 8
    assert metric(text, 'amusd:request_success_total{finished_reason="length"}') >= 1
    assert metric(text, 'amusd:request_failure_total{reason="invalid_request"}') >= 0
    assert metric(text, "amusd:spec_decode_num_draft_tokens_total") > 0      # async mode drafts
    assert metric(text, 'amusd:worker_busy_seconds_total{worker="verify"}') > 0
    assert metric(text, 'amusd:worker_busy_seconds_total{worker="draft"}') > 0
    assert metric(text, 'amusd:worker_up{worker="verify"}') == 1.0
    assert metric(text, 'amusd:worker_up{worker="draft"}') == 1.0
    assert 'amusd:worker_restarts_total{worker="verify"} 0.0' in text
    assert metric(text, "amusd:num_requests_running") == 0 and metric(text, "amusd:num_requests_waiting") == 0
