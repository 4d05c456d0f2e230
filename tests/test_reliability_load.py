"""Load and soak against the REAL server (configs/tiny.yaml, async mode, --max-queue-size 64).

    load  the load generator (`python -m loadtest`, a subprocess) with 32 concurrent streaming
          chat clients, 200 requests of 16 tokens with 200 distinct prompts, 20 % of them hanging
          up mid-stream on purpose: exit code 0, every request completed or disconnected on purpose
          (0 lost, 0 errors, 0 4xx/5xx: no fault is injected), and every completed greedy text equals
          the text the same prompt gets alone (no mix-up between concurrent requests); afterwards
          the queue gauges in /metrics return to 0 and a normal request completes
    soak  500 sequential small requests on one keep-alive connection: the resident memory of the
          frontend and of each worker, after 50 warm-up requests and at the end, grows by less
          than max(30 MiB, 15 %)

Figures (outcome counts, latency percentiles, RSS before/after) are printed: run with -s.
Both run in CI (the soak takes well under a minute with the tiny models).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO, LiveServer

NUM_REQUESTS, CONCURRENCY, MAX_TOKENS, DISCONNECT_FRACTION = 200, 32, 16, 0.2
SOAK_REQUESTS, SOAK_WARMUP = 500, 50
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def live():
    server = LiveServer("--max-queue-size", "64").start()
    yield server
    server.stop()


def metric(live: LiveServer, name: str) -> float | None:
    text = httpx.get(live.url("/metrics"), timeout=5).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def queue_gauges(live: LiveServer) -> tuple[float | None, float | None]:
    return metric(live, "amusd:num_requests_running"), metric(live, "amusd:num_requests_waiting")


def _distinct_prompts(path, num: int) -> None:
    words = ["river", "copper", "violin", "lantern", "meadow", "orbit", "pepper", "quartz", "saddle", "tulip"]
    with open(path, "w") as f:
        for i in range(num):
            f.write(json.dumps({"prompt": f"Request {i}: write about {words[i % 10]} and {words[i // 10 % 10]}."}) + "\n")


def _alone(live: LiveServer, prompt: str) -> str:
    """The greedy text of `prompt` sent on its own (the same parameters as the load run)."""
    body = {"model": live.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0.0}
    resp = httpx.post(live.url("/v1/chat/completions"), json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def test_load_32_streaming_clients_nothing_lost(live, tmp_path):
    report_path = tmp_path / "load.json"
    _distinct_prompts(tmp_path / "prompts.jsonl", NUM_REQUESTS)
    cmd = [sys.executable, "-m", "loadtest", "--base-url", live.base_url, "--endpoint", "chat",
           "--dataset", str(tmp_path / "prompts.jsonl"), "--num-requests", str(NUM_REQUESTS), "--concurrency", str(CONCURRENCY),
           "--max-tokens", str(MAX_TOKENS), "--disconnect-fraction", str(DISCONNECT_FRACTION),
           "--timeout-s", "240", "--read-timeout-s", "60", "--json", str(report_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    print("\n" + proc.stdout)
    assert proc.returncode == 0, f"loadtest exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(report_path.read_text())

    assert report["num_requests"] == NUM_REQUESTS
    assert report["num_lost"] == 0 and report["num_dropped"] == 0 and report["num_truncated"] == 0
    assert report["num_timed_out"] == 0 and report["num_stream_errors"] == 0
    # No fault injected and the queue (64) holds every client (32): nothing but completions and hang-ups.
    assert set(report["status_counts"]) <= {"completed", "disconnected"}, report["status_counts"]
    assert report["num_http_4xx"] == 0 and report["num_http_5xx"] == 0
    assert report["num_completed"] + report["num_disconnected"] == NUM_REQUESTS
    # (a planned hang-up after n chunks does not happen when the answer came in fewer chunks)
    assert 0 < report["num_disconnected"] <= round(DISCONNECT_FRACTION * NUM_REQUESTS)
    completed = [r for r in report["requests"] if r["status"] == "completed"]
    assert len({r["prompt"] for r in completed}) == len(completed), "the prompts must be distinct"
    mixed_up = []
    for record in completed:
        assert record["finish_reason"] in ("stop", "length"), record
        if record["text"] != _alone(live, record["prompt"]):
            mixed_up.append(record["index"])
    assert not mixed_up, f"{len(mixed_up)} concurrent requests got another text than alone: {mixed_up[:10]}"

    # afterwards: no leaked queue slot, the engine is idle, a normal request is served at once
    deadline = time.monotonic() + 30
    while queue_gauges(live) != (0.0, 0.0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_gauges(live) == (0.0, 0.0), queue_gauges(live)
    t0 = time.monotonic()
    resp = httpx.post(live.url("/v1/completions"), timeout=30,
                      json={"model": live.model, "prompt": "after the storm", "max_tokens": 8})
    after_s = time.monotonic() - t0
    assert resp.status_code == 200 and after_s < 30, (resp.status_code, after_s)   # generous: slow CPUs
    assert httpx.get(live.url("/health")).status_code == 200

    ttft, e2e = report["ttft_ms"], report["e2e_ms"]
    print(f"[load] {NUM_REQUESTS} requests, {CONCURRENCY} concurrent: {report['status_counts']} "
          f"(HTTP codes {report['http_status_counts']}); TTFT p50 {ttft['p50']:.0f} ms p99 {ttft['p99']:.0f} ms; "
          f"E2E p50 {e2e['p50']:.0f} ms p99 {e2e['p99']:.0f} ms; {report['duration_s']:.1f} s; "
          f"request after the run {after_s * 1000:.0f} ms")


def _rss(procs: dict[str, psutil.Process]) -> dict[str, int]:
    return {name: p.memory_info().rss for name, p in procs.items()}


def test_soak_sequential_requests_rss_stays_flat(live):
    workers = httpx.get(live.url("/health")).json()["workers"]
    procs = {"frontend": psutil.Process(live.proc.pid),
             **{role: psutil.Process(w["pid"]) for role, w in workers.items()}}
    body = {"model": live.model, "max_tokens": 4, "temperature": 0}
    started = time.monotonic()
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        for i in range(SOAK_REQUESTS):
            if i == SOAK_WARMUP:
                before = _rss(procs)
            resp = client.post("/v1/completions", json={**body, "prompt": f"soak request number {i}"})
            assert resp.status_code == 200, f"request {i}: {resp.status_code} {resp.text}"
    after = _rss(procs)
    duration_s = time.monotonic() - started
    growth = {name: after[name] - before[name] for name in procs}
    print("\n[soak] " + f"{SOAK_REQUESTS} requests in {duration_s:.1f} s; RSS after {SOAK_WARMUP} warm-up -> end: "
          + ", ".join(f"{n} {before[n] / MIB:.1f} -> {after[n] / MIB:.1f} MiB ({growth[n] / MIB:+.1f})"
                      for n in procs))
    current = httpx.get(live.url("/health")).json()["workers"]
    assert {role: w["pid"] for role, w in current.items()} == {role: w["pid"] for role, w in workers.items()}, \
        "a worker was restarted during the soak"
    for name in procs:
        bound = max(30 * MIB, 0.15 * before[name])
        assert growth[name] < bound, f"{name} RSS grew by {growth[name] / MIB:.1f} MiB over {SOAK_REQUESTS} requests"
    assert queue_gauges(live) == (0.0, 0.0)
