"""Measure any OpenAI-compatible server (llama.cpp's llama-server, vLLM, amusd) on given prompts.

Used by `amusd bench --peer-url URL` so that a peer runs the very prompts the engine methods run,
in the same invocation. Sequential, streaming `/v1/completions`, greedy:

    samples = measure_completions("http://127.0.0.1:8100", ["def add(a, b):", ...], max_tokens=96)
    samples[i] = {"text", "elapsed_s", "ttft_s", "chunk_times_s", "num_usage_tokens"}

The prompt goes as text (decode token ids first), so the peer tokenizes it itself; chat prompts
rendered with the model's template keep their special tokens as text, which llama-server parses.
"""
from __future__ import annotations

import json
import time

import httpx

from loadtest.client import NO_PENALTY


def first_model_id(client: httpx.Client) -> str:
    try:
        response = client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return ""


def measure_completions(base_url: str, prompts: list[str], max_tokens: int, temperature: float = 0.0,
                        timeout_s: float = 600.0) -> list[dict]:
    samples = []
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        model = first_model_id(client)
        for prompt in prompts:
            samples.append(_one_completion(client, model, prompt, max_tokens, temperature))
    return samples


def _one_completion(client: httpx.Client, model: str, prompt: str, max_tokens: int, temperature: float) -> dict:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
               "stream": True, "stream_options": {"include_usage": True}, **NO_PENALTY}
    texts, chunk_times, usage_tokens = [], [], None
    start = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"peer answered HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            text = "".join(choice.get("text") or "" for choice in chunk.get("choices") or [])
            if text:
                texts.append(text)
                chunk_times.append(time.perf_counter() - start)
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
    elapsed = time.perf_counter() - start
    return {"text": "".join(texts), "elapsed_s": elapsed, "ttft_s": chunk_times[0] if chunk_times else None,
            "chunk_times_s": chunk_times, "num_usage_tokens": usage_tokens}
