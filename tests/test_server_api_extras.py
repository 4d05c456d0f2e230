"""What clients rely on beyond one completion, against a FakeSupervisor: n > 1 and prompt lists
(through the official `openai` client), echo + prompt logprobs, /tokenize /detokenize /version,
system_fingerprint, Retry-After on 429 / 503, and vLLM's metric names.
"""
from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest

from engine.messages import RequestStats
from server.metrics import VLLM_NAMES, ServerMetrics
from tests.test_server_fake import assert_openai_error, sse_events

TEXT = "Hello, world. "


def client(fs) -> openai.OpenAI:
    return openai.OpenAI(base_url=fs.base_url + "/v1", api_key="none", max_retries=0)


def test_n_and_prompt_lists_with_the_openai_client(fake_server):
    with fake_server(text=TEXT, default_temperature=0.0) as fs:
        c = client(fs)
        r = c.completions.create(model="fake", prompt=["ab", "cd"], n=2, max_tokens=3, seed=5)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and all(ch.text == "Hel" for ch in r.choices)
        runs = fs.supervisor.submitted[-4:]
        assert [q.prompt_token_ids for q in runs] == [[97, 98], [97, 98], [99, 100], [99, 100]]
        assert [q.params.seed for q in runs] == [5, 6, 5, 6]           # sample j: seed + j, as vLLM
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 12)   # each prompt counted once
        assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
        r = c.completions.create(model="fake", prompt=[[97, 98], [99, 100]], max_tokens=2)
        assert [(ch.index, ch.text) for ch in r.choices] == [(0, "He"), (1, "He")]
        assert [q.prompt_token_ids for q in fs.supervisor.submitted[-2:]] == [[97, 98], [99, 100]]
        texts: dict[int, str] = {}
        for chunk in c.completions.create(model="fake", prompt=["ab", "cd"], max_tokens=4, stream=True,
                                          echo=True):
            for ch in chunk.choices:
                texts[ch.index] = texts.get(ch.index, "") + ch.text
        assert texts == {0: "abHell", 1: "cdHell"}
        chat = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], n=3,
                                         max_tokens=2)
        assert [(ch.index, ch.message.content) for ch in chat.choices] == [(0, "He"), (1, "He"), (2, "He")]
        deltas: dict[int, str] = {}
        roles = []
        stream = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], n=2,
                                           max_tokens=3, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            for ch in chunk.choices:
                deltas[ch.index] = deltas.get(ch.index, "") + (ch.delta.content or "")
                roles += [ch.index] if ch.delta.role else []
            usage = chunk.usage
        assert deltas == {0: "Hel", 1: "Hel"} and roles == [0, 1] and usage.completion_tokens == 6
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="fake", prompt=["a"] * 9, n=2, max_tokens=1)   # 18 > max_choices 16


def test_echo_with_logprobs_gives_prompt_logprobs(fake_server):
    with fake_server(text=TEXT) as fs:
        body = {"prompt": "ab", "max_tokens": 3, "echo": True, "logprobs": 1}
        r = httpx.post(fs.url("/v1/completions"), json=body).json()
        assert fs.supervisor.submitted[-1].params.num_prompt_logprobs == 1
        lp = r["choices"][0]["logprobs"]
        assert r["choices"][0]["text"] == "abHel"
        assert lp["tokens"] == ["a", "b", "H", "e", "l"]
        assert lp["token_logprobs"] == [None, -1.0, -0.5, -0.5, -0.5]      # the first prompt token: null
        assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"b": -1.0}
        assert lp["text_offset"] == [0, 1, 2, 3, 4]
        r = httpx.post(fs.url("/v1/completions"), json={**body, "prompt": "é", "max_tokens": 1}).json()
        assert r["choices"][0]["logprobs"]["text_offset"] == [0, 1, 1]   # generated text starts after the echo
        with httpx.stream("POST", fs.url("/v1/completions"), json={**body, "stream": True}) as resp:
            events = sse_events(resp)
        first = events[0]["choices"][0]
        assert first["text"] == "ab" and first["logprobs"]["token_logprobs"] == [None, -1.0]
        assert "".join(e["choices"][0]["text"] for e in events) == "abHel"
        httpx.post(fs.url("/v1/completions"), json={"prompt": "ab", "max_tokens": 1, "logprobs": 1})
        assert fs.supervisor.submitted[-1].params.num_prompt_logprobs is None     # no echo: not asked for


def test_tokenize_detokenize_version(fake_server):
    with fake_server(api_keys=["k"]) as fs:
        auth = {"Authorization": "Bearer k"}
        assert_openai_error(httpx.post(fs.url("/tokenize"), json={"prompt": "hi"}), 401)
        r = httpx.post(fs.url("/tokenize"), json={"prompt": "hi", "return_token_strs": True}, headers=auth).json()
        assert r == {"count": 2, "max_model_len": 512, "tokens": [104, 105], "token_strs": ["h", "i"]}
        r = httpx.post(fs.url("/tokenize"), json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth).json()
        assert r["tokens"][0] == 257 and r["count"] == len(r["tokens"])             # <|im_start|>user ...
        assert httpx.post(fs.url("/detokenize"), json={"tokens": [104, 105]}, headers=auth).json() == {"prompt": "hi"}
        for path, body, param in (("/detokenize", {"tokens": [259]}, "tokens"), ("/tokenize", {}, "prompt"),
                                  ("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
                                  ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus")):
            assert assert_openai_error(httpx.post(fs.url(path), json=body, headers=auth), 400)["param"] == param
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", httpx.get(fs.url("/version")).json()["version"])


def test_retry_after_on_429_and_503(fake_server):
    with fake_server(max_queue_size=1, delay_s=0.05) as fs:
        assert httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 20}).status_code == 200
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.setdefault(k, httpx.post(
            fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 20}, timeout=30))) for k in "ab"]
        for t in threads:               # a: running (~0.5 s), b: waiting
            t.start()
            time.sleep(0.15)
        resp = httpx.post(fs.url("/v1/completions"), json={"prompt": "x"})
        assert_openai_error(resp, 429)
        # 2 ahead (1 running + 1 waiting) x ~0.5 s per request: 1..2 s
        assert 1 <= int(resp.headers["Retry-After"]) <= 2, resp.headers
        for t in threads:
            t.join()
        fs.supervisor.healthy = False
        resp = httpx.post(fs.url("/v1/completions"), json={"prompt": "x"})
        assert_openai_error(resp, 503)
        assert int(resp.headers["Retry-After"]) >= 1


def test_vllm_metric_names(fake_server):
    with fake_server(metrics_names="vllm") as fs:
        assert httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2}).status_code == 200
        text = httpx.get(fs.url("/metrics")).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:generation_tokens_total",
                 "vllm:prompt_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
                 "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_drafts_total",
                 "amusd:spec_decode_num_rollbacks_total", "amusd:worker_up"):
        assert re.search(rf'^{name}{{(.*,)?model_name="fake"', text, re.M), name
    assert re.search(r'^vllm:request_success_total\{.*finished_reason="length".*\} 1\.0$', text, re.M)
    assert re.search(r'^vllm:generation_tokens_total\{model_name="fake"\} 2\.0$', text, re.M)
    assert "amusd:time_to_first_token" not in text and "amusd:num_requests" not in text


def test_default_metric_names_unchanged():
    m = ServerMetrics(names="amusd")
    m.record_finished("stop", 1.0, RequestStats(num_generated_tokens=3))
    text = m.render().decode()
    assert "vllm:" not in text and "model_name" not in text
    assert "amusd:generation_tokens_total 3.0" in text
    for name in VLLM_NAMES:
        assert f"amusd:{name}" in text, name
