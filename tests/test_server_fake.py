"""Server behaviour against a FakeSupervisor (real uvicorn + HTTP, fake engine): fast and exact.

Covers what is hard to make deterministic with real models: auth, body limits, engine failure
mid-stream, unhealthy workers, queue timeout, cancellation bookkeeping, logprobs and echo shapes.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

FAKE_TEXT = "Hello, wörld! 你好. "


def sse_events(resp: httpx.Response) -> list:
    lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_api_keys(fake_server):
    with fake_server(api_keys=["k1", "secret-2"]) as fs:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k1"},
                        {"Authorization": "Bearer"}):
            err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json=body, headers=headers), 401)
            assert err["code"] == "invalid_api_key" and "k1" not in err["message"]
        # auth is checked before the body is parsed
        assert_openai_error(httpx.post(fs.url("/v1/completions"), content=b"{not json",
                                       headers={"content-type": "application/json"}), 401)
        assert_openai_error(httpx.get(fs.url("/v1/models")), 401)
        ok = httpx.post(fs.url("/v1/completions"), json=body, headers={"Authorization": "Bearer secret-2"})
        assert ok.status_code == 200, ok.text
        assert httpx.get(fs.url("/health")).status_code == 200            # open
        assert httpx.get(fs.url("/metrics")).status_code == 200           # open by default
    with fake_server(api_keys=["k1"], metrics_require_auth=True) as fs:
        assert_openai_error(httpx.get(fs.url("/metrics")), 401)
        assert httpx.get(fs.url("/metrics"), headers={"Authorization": "Bearer k1"}).status_code == 200


def test_body_too_large(fake_server):
    with fake_server(max_request_body_bytes=2048) as fs:
        err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={"prompt": "x" * 5000}), 413)
        assert err["code"] == "request_too_large"

        def chunked():   # no content-length: the limit must hold while streaming the body in
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'
        assert_openai_error(httpx.post(fs.url("/v1/completions"), content=chunked(),
                                       headers={"content-type": "application/json"}), 413)
        assert httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_unhealthy_engine_gives_503(fake_server):
    with fake_server() as fs:
        fs.supervisor.healthy = False
        resp = httpx.get(fs.url("/health"))
        assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
        err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={"prompt": "x"}), 503)
        assert err["code"] == "engine_not_ready"
        fs.supervisor.healthy = True
        assert httpx.get(fs.url("/health")).status_code == 200
        assert "amusd:worker_up" in httpx.get(fs.url("/metrics")).text


def test_engine_failure_mid_stream_ends_with_error_event_and_done(fake_server):
    with fake_server() as fs:
        fs.supervisor.fail_after_tokens = 4
        with httpx.stream("POST", fs.url("/v1/chat/completions"), json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}) as resp:
            assert resp.status_code == 200
            events = sse_events(resp)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "error" in events[-1] and events[-1]["error"]["code"] == "engine_error"
        # non-streaming: a 503 with an OpenAI body (the worker is being restarted)
        err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 50}), 503)
        assert err["type"] == "service_unavailable"
        fs.supervisor.fail_after_tokens = None
        assert httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 3}).status_code == 200
        metrics = httpx.get(fs.url("/metrics")).text
        assert 'amusd:request_failure_total{reason="engine_error"} 2.0' in metrics


def test_queue_full_and_queue_timeout(fake_server):
    with fake_server(max_queue_size=1, queue_timeout_s=0.5, delay_s=0.05) as fs:
        results = {}

        def long_request(key, max_tokens):
            results[key] = httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": max_tokens},
                                      timeout=30)
        running = threading.Thread(target=long_request, args=("a", 40))   # ~1 s in the engine
        running.start()
        time.sleep(0.2)
        waiting = threading.Thread(target=long_request, args=("b", 2))    # waits, times out after 0.5 s
        waiting.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={"prompt": "x"}), 429)
        assert time.monotonic() - t0 < 0.5 and err["code"] == "queue_full"
        running.join()
        waiting.join()
        assert results["a"].status_code == 200
        assert assert_openai_error(results["b"], 503)["code"] == "queue_timeout"
        metrics = httpx.get(fs.url("/metrics")).text
        assert 'amusd:request_failure_total{reason="queue_full"} 1.0' in metrics
        assert 'amusd:request_failure_total{reason="queue_timeout"} 1.0' in metrics
        assert "amusd:num_requests_waiting 0.0" in metrics and "amusd:num_requests_running 0.0" in metrics


def test_several_requests_run_at_once_when_the_engine_has_room(fake_server):
    """The frontend hands the engine as many requests as it runs at once (supervisor.max_num_running,
    issue #10), queues the rest FIFO, and answers 429 only when its own queue is full."""
    with fake_server(max_num_running=3, max_queue_size=2, delay_s=0.05) as fs:
        results = {}

        def request(key):
            results[key] = httpx.post(fs.url("/v1/completions"), timeout=30,
                                      json={"prompt": "x", "max_tokens": 40, "ignore_eos": True})
        threads = [threading.Thread(target=request, args=(i,)) for i in range(5)]     # 3 running + 2 waiting
        for t in threads:
            t.start()
            time.sleep(0.02)
        deadline, metrics = time.monotonic() + 5, ""
        while time.monotonic() < deadline and not ("amusd:num_requests_running 3.0" in metrics
                                                   and "amusd:num_requests_waiting 2.0" in metrics):
            metrics = httpx.get(fs.url("/metrics")).text
            time.sleep(0.02)
        assert "amusd:num_requests_running 3.0" in metrics and "amusd:num_requests_waiting 2.0" in metrics
        assert assert_openai_error(httpx.post(fs.url("/v1/completions"), json={"prompt": "x"}), 429)["code"] \
            == "queue_full"
        for t in threads:
            t.join()
        texts = {results[i].json()["choices"][0]["text"] for i in range(5)}
        assert all(results[i].status_code == 200 for i in range(5)) and len(texts) == 1
        assert fs.supervisor.max_num_running_seen == 3
        metrics = httpx.get(fs.url("/metrics")).text
        assert "amusd:num_requests_waiting 0.0" in metrics and "amusd:num_requests_running 0.0" in metrics


def test_a_hang_up_frees_its_place_for_a_waiting_request_while_the_others_go_on(fake_server):
    with fake_server(max_num_running=2, delay_s=0.05) as fs:
        long = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", fs.url("/v1/completions"), json=long, timeout=30) as kept:
            kept_lines = kept.iter_lines()
            assert kept.status_code == 200 and next(kept_lines)
            with httpx.stream("POST", fs.url("/v1/completions"), json=long, timeout=30) as dropped:
                dropped_lines = dropped.iter_lines()      # kept referenced: a collected iterator hangs up
                assert dropped.status_code == 200 and next(dropped_lines)
                assert "amusd:num_requests_running 2.0" in httpx.get(fs.url("/metrics")).text
                result = {}
                waiting = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
                    fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 4}, timeout=30)))
                waiting.start()
                time.sleep(0.3)
                assert "r" not in result, "both places are taken: the third request must wait"
            t0 = time.monotonic()                    # hung up: the waiting request takes that place
            waiting.join(5)
            assert result["r"].status_code == 200 and time.monotonic() - t0 < 2.0
            more = [next(kept_lines) for _ in range(4)]     # the kept stream still streams
            assert sum(line.startswith("data: {") for line in more) >= 2, more


def test_disconnect_cancels_waiting_and_running(fake_server):
    with fake_server(delay_s=0.05) as fs:
        body = {"prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", fs.url("/v1/completions"), json=body) as resp:
            next(resp.iter_lines())                       # running; now hang up
        with pytest.raises(httpx.ReadTimeout):           # non-streaming: client gives up
            httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 200}, timeout=0.3)
        t0 = time.monotonic()
        resp = httpx.post(fs.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert resp.status_code == 200 and time.monotonic() - t0 < 2.0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            metrics = httpx.get(fs.url("/metrics")).text
            if 'amusd:request_success_total{finished_reason="abort"} 2.0' in metrics:
                break
            time.sleep(0.05)
        assert 'amusd:request_success_total{finished_reason="abort"} 2.0' in metrics
        assert len(fs.supervisor._cancelled) == 0          # both cancels reached the engine


def test_stream_stop_string_never_leaks(fake_server):
    with fake_server(text=FAKE_TEXT * 4, tokens_per_step=3) as fs:
        with httpx.stream("POST", fs.url("/v1/completions"), json={
                "prompt": "x", "max_tokens": 100, "stream": True, "stop": ["wörld"]}) as resp:
            events = sse_events(resp)
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text == "Hello, "
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert events[-1]["choices"][0]["stop_reason"] == "wörld"


def test_logprobs_and_echo_shapes(fake_server):
    with fake_server() as fs:
        r = httpx.post(fs.url("/v1/completions"), json={"prompt": "ab", "max_tokens": 4, "logprobs": 2}).json()
        lp = r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
        assert r["choices"][0]["text"] == "Hell"
        r = httpx.post(fs.url("/v1/completions"), json={"prompt": "ab", "max_tokens": 3, "echo": True}).json()
        assert r["choices"][0]["text"] == "abHel"
        r = httpx.post(fs.url("/v1/chat/completions"), json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 10, "logprobs": True,
            "top_logprobs": 1}).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 10 and all(len(c["top_logprobs"]) == 1 for c in content)
        assert [c["bytes"] for c in content[8:10]] == [[0xC3], [0xB6]]     # "ö" split across 2 tokens
        assert r["choices"][0]["message"]["content"] == "Hello, wö"


def test_sampling_params_reach_engine(fake_server):
    with fake_server(default_temperature=0.0) as fs:
        httpx.post(fs.url("/v1/chat/completions"), json={
            "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3, "max_tokens": 50,
            "temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.05, "seed": 7, "ignore_eos": True})
        httpx.post(fs.url("/v1/completions"), json={"prompt": "x"})
        chat, completion = fs.supervisor.submitted[-2:]
        p = chat.params
        assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.ignore_eos) == \
            (3, 0.7, 0.9, 0, 0.05, 7, True)
        assert completion.params.max_tokens == 16 and completion.params.temperature == 0.0
        assert chat.prompt_token_ids[-len("assistant\n"):] == list(b"assistant\n")


def test_drain_cancels_what_is_left_after_grace(fake_server):
    from server.app import begin_drain
    with fake_server(shutdown_grace_s=0.5, delay_s=0.05) as fs:
        with httpx.stream("POST", fs.url("/v1/completions"), json={
                "prompt": "x", "max_tokens": 500, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(lines)
            begin_drain(fs.app)                              # what SIGTERM does in server/main.py
            time.sleep(0.1)
            assert httpx.get(fs.url("/health")).status_code == 503
            err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={"prompt": "x"}), 503)
            assert "shutting down" in err["message"]
            t0 = time.monotonic()
            rest = [ln for ln in lines if ln]
        assert time.monotonic() - t0 < 3
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["type"] == "service_unavailable"


def test_bad_settings_exit_2(capsys):
    from server.main import main
    assert main(["--mode", "bogus"]) == 2
    assert "mode must be one of" in capsys.readouterr().err
    assert main(["--max-queue-size", "-1"]) == 2
    assert main(["--help"]) == 0


def test_a_request_waiting_for_kv_room_counts_as_waiting_and_one_that_never_fits_gets_400(fake_server):
    """The engine's line (engine/admission.py) is the only queue: a request held back by the KV budget
    is waiting, not running, and one larger than the whole budget is refused before it queues."""
    with fake_server(max_num_running=4, delay_s=0.02) as fs:
        fs.supervisor._line.kv_budget_tokens = 150           # room for one 1 + 100 token reservation
        body = {"prompt": "x", "max_tokens": 100, "ignore_eos": True}
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.setdefault(i, httpx.post(
            fs.url("/v1/completions"), json=body, timeout=60))) for i in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        metrics = httpx.get(fs.url("/metrics")).text
        assert "amusd:num_requests_running 1.0" in metrics and "amusd:num_requests_waiting 1.0" in metrics
        err = assert_openai_error(httpx.post(fs.url("/v1/completions"), json={**body, "max_tokens": 200}), 400)
        assert "kv_cache_memory_gb" in err["message"]
        for t in threads:
            t.join()
        assert [results[i].status_code for i in range(2)] == [200, 200]
        assert fs.supervisor.max_num_running_seen == 1
        metrics = httpx.get(fs.url("/metrics")).text
        assert "amusd:num_requests_waiting 0.0" in metrics and "amusd:num_requests_running 0.0" in metrics
