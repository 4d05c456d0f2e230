"""Tests of the load generator (loadtest/) against an in-test fake OpenAI streaming server.

The fake is FastAPI + sse-starlette served by uvicorn in a thread on a free port. Its behaviour
(tokens per answer, every k-th request 429 / truncated / erroring, usage chunk or not) is set
per test. Run: .venv/bin/python -m pytest -q tests/test_loadtest.py
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from loadtest import cli, overhead
from loadtest.client import RequestOptions
from loadtest.datasets import DatasetError, Prompt, load_prompts
from loadtest.report import percentile
from loadtest.runner import LoadConfig, make_plans


@dataclass
class FakeBehavior:
    num_tokens: int = 6                 # tokens per answer (capped by max_tokens)
    reject_every: int = 0               # every k-th request gets 429 (0 = never)
    truncate_every: int = 0             # every k-th stream stops early, no finish_reason, no [DONE]
    error_every: int = 0                # every k-th stream carries an error object
    token_delay_s: float = 0.001
    is_usage_sent: bool = True


def make_fake_app(behavior: FakeBehavior) -> FastAPI:
    app = FastAPI()
    num_seen = {"requests": 0}

    def nth(every: int, number: int) -> bool:
        return every > 0 and number % every == 0

    async def answer(request: Request, is_chat: bool):
        body = await request.json()
        num_seen["requests"] += 1
        number = num_seen["requests"]
        if nth(behavior.reject_every, number):
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit"}}, status_code=429)
        num_tokens = min(behavior.num_tokens, body.get("max_tokens", 16))
        is_usage_wanted = behavior.is_usage_sent and (body.get("stream_options") or {}).get("include_usage")

        def chunk(text: str, finish_reason: str | None) -> dict:
            choice = {"index": 0, "finish_reason": finish_reason}
            if is_chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            return {"data": json.dumps({"id": f"req-{number}", "choices": [choice]})}

        async def events():
            if is_chat:
                yield {"data": json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})}
            for i in range(num_tokens):
                await asyncio.sleep(behavior.token_delay_s)
                if nth(behavior.truncate_every, number) and i == num_tokens // 2:
                    return
                if nth(behavior.error_every, number) and i == 1:
                    yield {"data": json.dumps({"error": {"message": "engine failed"}})}
                    return
                yield chunk(f"t{i} ", "length" if i == num_tokens - 1 else None)
            if is_usage_wanted:
                yield {"data": json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": num_tokens}})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, is_chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, is_chat=False)

    return app


class FakeServer:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, behavior: FakeBehavior):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(make_fake_app(behavior), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(base_url: str, tmp_path, *extra: str) -> tuple[int, dict]:
    report_path = tmp_path / "report.json"
    exit_code = cli.main(["--base-url", base_url, "--dataset", "chat", "--max-tokens", "8",
                          "--timeout-s", "20", "--json", str(report_path), *extra])
    return exit_code, json.loads(report_path.read_text())


# --- against the fake server ---------------------------------------------------------------------

def test_all_requests_complete_and_report_is_written(tmp_path, capsys):
    with FakeServer(FakeBehavior(num_tokens=6)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "20", "--concurrency", "4",
                                    "--plot", str(tmp_path / "plot.png"))
    assert exit_code == 0
    assert report["num_completed"] == 20 and report["num_lost"] == 0 and report["num_requests"] == 20
    assert report["num_output_tokens"] == 20 * 6
    assert report["config"]["model"] == "fake-model"
    assert report["ttft_ms"]["count"] == 20 and report["itl_ms"]["count"] == 20 * 5
    assert report["tpot_ms"]["p50"] > 0 and report["output_tokens_per_s"] > 0
    assert len(report["requests"]) == 20 and all(r["status"] == "completed" for r in report["requests"])
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert "LOST               0" in capsys.readouterr().out


def test_completions_without_usage_counts_chunks(tmp_path):
    with FakeServer(FakeBehavior(num_tokens=5, is_usage_sent=False)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "6", "--endpoint", "completions")
    assert exit_code == 0
    assert report["num_completed"] == 6 and report["num_output_tokens"] == 6 * 5
    assert all(r["num_usage_tokens"] is None for r in report["requests"])


def test_429_is_counted_by_code_and_not_lost(tmp_path):
    with FakeServer(FakeBehavior(reject_every=3)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "12", "--concurrency", "3")
    assert exit_code == 0
    assert report["http_status_counts"] == {"429": 4} and report["num_http_4xx"] == 4
    assert report["num_completed"] == 8 and report["num_lost"] == 0


def test_truncated_streams_are_lost_and_fail_the_run(tmp_path, capsys):
    with FakeServer(FakeBehavior(truncate_every=4)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "12", "--concurrency", "1")
    assert exit_code == 1
    assert report["num_truncated"] == 3 and report["num_lost"] == 3 and report["num_completed"] == 9
    assert "3 request(s) lost" in capsys.readouterr().err


def test_stream_errors_are_failures_but_not_lost(tmp_path):
    with FakeServer(FakeBehavior(error_every=2)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "6", "--concurrency", "1")
    assert exit_code == 0
    assert report["num_stream_errors"] == 3 and report["num_completed"] == 3 and report["num_lost"] == 0


def test_intentional_disconnects_are_not_lost(tmp_path):
    with FakeServer(FakeBehavior(num_tokens=8)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "10",
                                    "--disconnect-fraction", "0.5", "--seed", "7")
    assert exit_code == 0
    assert report["num_disconnected"] == 5 and report["num_completed"] == 5 and report["num_lost"] == 0


def test_overall_timeout_cancels_and_fails(tmp_path):
    with FakeServer(FakeBehavior(num_tokens=8, token_delay_s=0.5)) as fake:
        exit_code = cli.main(["--base-url", fake.base_url, "--dataset", "chat", "--num-requests", "3",
                              "--timeout-s", "0.6", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert exit_code == 1 and report["num_timed_out"] == 3 and report["num_lost"] == 0


def test_refused_connection_counts_as_dropped(tmp_path):
    exit_code, report = run_cli(f"http://127.0.0.1:{free_port()}", tmp_path, "--num-requests", "3",
                                "--model", "m")
    assert exit_code == 1 and report["num_dropped"] == 3 and report["num_lost"] == 3


def test_poisson_arrivals_spread_requests(tmp_path):
    with FakeServer(FakeBehavior(num_tokens=2)) as fake:
        exit_code, report = run_cli(fake.base_url, tmp_path, "--num-requests", "8", "--request-rate", "40")
    starts = sorted(r["start_s"] for r in report["requests"])
    assert exit_code == 0 and report["num_completed"] == 8 and starts[-1] > 0.02


def test_overhead_mode_reports_ms_per_token_and_budget(tmp_path, capsys):
    with FakeServer(FakeBehavior(num_tokens=4)) as fake:
        args = ["--base-url", fake.base_url, "--dataset", "humaneval", "--num-prompts", "3", "--max-tokens", "4"]
        assert overhead.main([*args, "--json", str(tmp_path / "o.json")]) == 0
        summary = json.loads((tmp_path / "o.json").read_text())
        assert overhead.main([*args, "--reference-ms-per-token", "0.001"]) == 1
    assert summary["num_completed"] == 3 and summary["num_output_tokens"] == 12
    assert summary["ms_per_token"] > 0 and summary["endpoint"] == "completions"
    assert "overhead" in capsys.readouterr().err


# --- pure functions ------------------------------------------------------------------------------

def test_percentiles_on_known_inputs():
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None
    assert percentile([10, 0, 20], 50) == 10
    samples = list(np.random.default_rng(2).gamma(2.0, size=333))
    for q in (50, 90, 99):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com:8000", "http://0.0.0.0:8000",
                                 "http://192.168.1.5", "ftp://127.0.0.1"])
def test_refuses_non_loopback_targets(url, capsys):
    assert cli.main(["--base-url", url, "--dataset", "chat"]) == 2
    assert "loadtest:" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.3.2.1:1", "http://localhost:9",
                                 "http://[::1]:8000"])
def test_allows_loopback_targets(url):
    assert cli.target_error(url) is None
    assert cli.target_error("http://10.0.0.1:8000", is_remote_allowed=True) is None


def test_plans_are_seeded_and_poisson():
    prompts = [Prompt(text=f"p{i}") for i in range(5)]
    config = LoadConfig(base_url="http://127.0.0.1:1", num_requests=2000, request_rate=10.0,
                        disconnect_fraction=0.1, seed=3, options=RequestOptions(max_tokens=10))
    plans = make_plans(prompts, config)
    assert plans == make_plans(prompts, config)
    gaps = [b.send_at_s - a.send_at_s for a, b in zip(plans, plans[1:])]
    assert min(gaps) >= 0 and sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    disconnects = [p.disconnect_after_chunks for p in plans if p.disconnect_after_chunks]
    assert len(disconnects) == 200 and 1 <= min(disconnects) and max(disconnects) <= 5


def test_datasets(tmp_path):
    humaneval = load_prompts("humaneval")
    assert len(humaneval) == 164 and humaneval[0].text.startswith("from typing import List")
    assert "Complete the following" in humaneval[0].chat_messages()[0]["content"]
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    prompts = load_prompts(str(path))
    assert [p.text for p in prompts] == ["hi", "yo"] and prompts[1].chat_messages()[0]["content"] == "yo"
    path.write_text('{"nope": 1}\n')
    with pytest.raises(DatasetError, match="p.jsonl:1"):
        load_prompts(str(path))
    assert cli.main(["--dataset", str(path)]) == 2
    assert cli.main(["--dataset", "chat", "--concurrency", "0"]) == 2


def test_peer_url_runs_the_same_requests_against_a_second_server(tmp_path, capsys):
    with FakeServer(FakeBehavior(num_tokens=6, token_delay_s=0.001)) as ours, \
            FakeServer(FakeBehavior(num_tokens=6, token_delay_s=0.03)) as peer:
        exit_code, report = run_cli(ours.base_url, tmp_path, "--num-requests", "4", "--concurrency", "1",
                                    "--peer-url", peer.base_url)
    assert exit_code == 0
    assert report["num_completed"] == 4 and report["peer"]["num_completed"] == 4
    assert report["peer"]["config"]["base_url"] == peer.base_url
    assert report["peer"]["mean_token_ms"] > report["mean_token_ms"] > 0      # the slower fake is the peer
    out = capsys.readouterr().out
    assert f"vs peer {peer.base_url}: mean token time" in out


def test_peer_measure_completions_counts_usage_tokens_and_times():
    from loadtest.peer import measure_completions
    with FakeServer(FakeBehavior(num_tokens=5)) as fake:
        samples = measure_completions(fake.base_url, ["a", "b"], max_tokens=8)
    assert len(samples) == 2
    for sample in samples:
        assert sample["num_usage_tokens"] == 5 and len(sample["chunk_times_s"]) == 5
        assert 0 < sample["ttft_s"] <= sample["elapsed_s"] and sample["text"]
