"""The real server with continuous batching (`--mode ar --max-num-seqs 4`, tiny models): concurrent
HTTP clients run in one batch and each gets the text it gets alone."""
from __future__ import annotations

import threading

import httpx

from tests.conftest import LiveServer

PROMPTS = ["def add(a, b):", "Once upon a time", "The capital of France is", "import numpy as np\n",
           "SELECT * FROM", "Dear diary,"]


def test_concurrent_clients_share_the_batch_and_get_their_own_text():
    live = LiveServer("--mode", "ar", "--max-num-seqs", "4", "--max-tokens-limit", "256").start()
    try:
        def complete(prompt: str) -> str:
            resp = httpx.post(live.url("/v1/completions"), timeout=120, json={
                "model": live.model, "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True})
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["text"]

        alone = [complete(p) for p in PROMPTS]
        results: dict[int, str] = {}
        peak = {"running": 0.0}
        threads = [threading.Thread(target=lambda i=i: results.setdefault(i, complete(PROMPTS[i])))
                   for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for line in httpx.get(live.url("/metrics")).text.splitlines():
                if line.startswith("amusd:num_requests_running "):
                    peak["running"] = max(peak["running"], float(line.split()[-1]))
        for t in threads:
            t.join()
        assert [results[i] for i in range(len(PROMPTS))] == alone
        assert peak["running"] >= 2, "the requests never ran together"
        assert peak["running"] <= 4
        health = httpx.get(live.url("/health")).json()
        assert health["mode"] == "ar" and health["workers"]["verify"]["max_num_seqs"] == 4
    finally:
        live.stop()
