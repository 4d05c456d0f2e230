"""Sampling through HTTP on the real engine: seeds are reproducible across modes; logprobs are the
verify model's (greedy picks the top-1 logprob), streamed too."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import LiveServer

SEEDED = dict(prompt="seeded sample: ", max_tokens=24, temperature=0.8, top_p=0.9, seed=2024,
              extra_body={"top_k": 40, "ignore_eos": True})


@pytest.fixture(scope="module")
def ar_server():
    live = LiveServer("--mode", "ar").start()
    yield live
    live.stop()


def test_same_seed_same_completion_across_modes(server, ar_server):
    async_text = server.openai().completions.create(model=server.model, **SEEDED).choices[0].text
    ar_text = ar_server.openai().completions.create(model=ar_server.model, **SEEDED).choices[0].text
    again = server.openai().completions.create(model=server.model, **SEEDED).choices[0].text
    assert async_text == ar_text == again
    other = server.openai().completions.create(model=server.model, **{**SEEDED, "seed": 7}).choices[0].text
    assert other != async_text


def _check_greedy_logprobs(tokens, token_logprobs, top_logprobs):
    assert len(tokens) == len(token_logprobs) == len(top_logprobs) > 0
    for logprob, top in zip(token_logprobs, top_logprobs):
        assert logprob <= 0
        # greedy: the committed token is the top-1 (>=: byte tokens that decode to the same text, e.g.
        # partial UTF-8 shown as U+FFFD, collide as keys of OpenAI's top_logprobs dict)
        assert logprob >= max(top.values()) - 1e-4


def test_completion_logprobs_non_stream_and_stream(server):
    body = {"model": server.model, "prompt": "logprobs please", "max_tokens": 12, "temperature": 0,
            "logprobs": 3, "ignore_eos": True}
    result = httpx.post(server.url("/v1/completions"), json=body, timeout=60).json()
    lp = result["choices"][0]["logprobs"]
    _check_greedy_logprobs(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
    assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"])

    streamed_tokens, streamed_logprobs, streamed_top = [], [], []
    with httpx.stream("POST", server.url("/v1/completions"), json={**body, "stream": True}, timeout=60) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            chunk_lp = chunk["choices"][0].get("logprobs") if chunk["choices"] else None
            if chunk_lp:
                streamed_tokens += chunk_lp["tokens"]
                streamed_logprobs += chunk_lp["token_logprobs"]
                streamed_top += chunk_lp["top_logprobs"]
    _check_greedy_logprobs(streamed_tokens, streamed_logprobs, streamed_top)
    assert streamed_logprobs == pytest.approx(lp["token_logprobs"], abs=1e-5)
