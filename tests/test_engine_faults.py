"""Worker faults: kill -9 mid-request, a hung worker, start-up failures, clean shutdown."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from engine.config import EngineConfig
from engine.messages import GenerationRequest, SamplingParams
from engine.supervisor import EngineStartError, EngineSupervisor
from tests.engine_helpers import random_prompts, run, start_engine, tiny_config, wait_until as _wait

PROMPT = random_prompts(1, seed=5)[0]



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def expected(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "ar"))
    try:
        return run(sup, PROMPT, max_tokens=40, ignore_eos=True)[0]
    finally:
        sup.shutdown()


LONG = dict(max_tokens=3500, ignore_eos=True)      # many seconds of decoding: a kill lands mid-request


@pytest.mark.parametrize("role", ["draft", "verify"])
def test_kill_worker_mid_request_errors_then_recovers(cache_dir, expected, role):
    sup = start_engine(tiny_config(cache_dir, "async", max_model_len=4096))
    try:
        outputs = []
        sup.submit(GenerationRequest(1, PROMPT, SamplingParams(**LONG)), outputs.append)
        queued = []
        sup.submit(GenerationRequest(2, PROMPT, SamplingParams(max_tokens=40, ignore_eos=True)), queued.append)
        assert _wait(lambda: len(outputs) > 0, 30), "request never started"
        os.kill(sup.worker_pids()[role], signal.SIGKILL)
        assert _wait(lambda: any(o.finished for o in outputs), 30), "killed request hung"
        final = outputs[-1]
        assert final.finished and final.finish_reason == "error" and role in final.error, final
        # the queued request is served after the restart, with the correct output
        assert _wait(lambda: any(o.finished for o in queued), 60), "queued request vanished"
        assert queued[-1].finish_reason == "length"
        assert [t for o in queued for t in o.token_ids] == expected
        assert _wait(sup.is_healthy, 60)
        assert sup.health()["workers"][role]["num_restarts"] == 1
        assert run(sup, PROMPT, max_tokens=40, ignore_eos=True)[0] == expected
    finally:
        sup.shutdown()


def test_killed_mid_request_reports_error(cache_dir):
    """A long request whose verify worker dies ends with finish_reason 'error', promptly."""
    sup = start_engine(tiny_config(cache_dir, "ar", max_model_len=4096))
    try:
        outputs = []
        sup.submit(GenerationRequest(1, PROMPT, SamplingParams(**LONG)), outputs.append)
        assert _wait(lambda: len(outputs) > 0, 30)
        os.kill(sup.worker_pids()["verify"], signal.SIGKILL)
        assert _wait(lambda: any(o.finished for o in outputs), 30), "the request outlived its worker"
        assert outputs[-1].finish_reason == "error" and "verify worker died" in outputs[-1].error
        assert _wait(sup.is_healthy, 60)
    finally:
        sup.shutdown()


@pytest.mark.parametrize("mode", ["ar", "async"])
def test_worker_killed_while_blocked_sending_does_not_silence_its_successor(cache_dir, expected, mode):
    """The supervisor stops reading (a slow consumer), the verify blocks mid-send, then dies. With one
    multiprocessing.Queue for all workers the dead writer kept the queue's write lock, and the restarted
    worker's WorkerReady never arrived: /health stayed 503 forever. Each worker has its own pipe now."""
    sup = start_engine(tiny_config(cache_dir, mode, max_model_len=4096))
    gate = threading.Event()
    try:
        outputs = []

        def slow_consumer(out):             # runs on the scheduler thread: while it waits, nobody reads
            outputs.append(out)
            if len(outputs) == 1:
                gate.wait(60)

        sup.submit(GenerationRequest(1, PROMPT, SamplingParams(**LONG)), slow_consumer)
        assert _wait(lambda: len(outputs) == 1, 30), "request never started"
        # the verify fills its output pipe and blocks in send: its heartbeat stops
        assert _wait(lambda: sup.health()["workers"]["verify"]["heartbeat_age_s"] > 1.0, 60), sup.health()
        os.kill(sup.worker_pids()["verify"], signal.SIGKILL)
        gate.set()
        assert _wait(lambda: any(o.finished for o in outputs), 30), "the killed request hung"
        assert outputs[-1].finish_reason == "error", outputs[-1]
        assert _wait(sup.is_healthy, 60), f"never healthy again after the restart: {sup.health()}"
        assert run(sup, PROMPT, max_tokens=40, ignore_eos=True)[0] == expected
    finally:
        gate.set()
        sup.shutdown()


def test_hung_worker_is_detected_and_restarted(cache_dir, expected):
    sup = start_engine(tiny_config(cache_dir, "async", heartbeat_timeout_s=2))
    try:
        draft_pid = sup.worker_pids()["draft"]
        os.kill(draft_pid, signal.SIGSTOP)          # alive but not answering
        assert _wait(lambda: sup.worker_pids()["draft"] != draft_pid, 20), "hung worker not replaced"
        assert _wait(sup.is_healthy, 60)
        assert run(sup, PROMPT, max_tokens=40, ignore_eos=True)[0] == expected
    finally:
        sup.shutdown()


@pytest.mark.parametrize("role", ["verify", "draft"])
def test_worker_hung_during_a_request_ends_it_with_an_error(cache_dir, expected, role):
    sup = start_engine(tiny_config(cache_dir, "async", max_model_len=4096, heartbeat_timeout_s=2))
    try:
        outputs = []
        sup.submit(GenerationRequest(1, PROMPT, SamplingParams(**LONG)), outputs.append)
        assert _wait(lambda: len(outputs) > 0, 30)
        hung_pid = sup.worker_pids()[role]
        os.kill(hung_pid, signal.SIGSTOP)               # alive, silent, mid-request
        assert _wait(lambda: any(o.finished for o in outputs), 60), "a hung worker hung the request"
        assert outputs[-1].finish_reason == "error" and "heartbeat" in outputs[-1].error, outputs[-1]
        assert _wait(sup.is_healthy, 60) and sup.worker_pids()[role] != hung_pid
        assert run(sup, PROMPT, max_tokens=40, ignore_eos=True)[0] == expected
    finally:
        sup.shutdown()


def test_restarts_exhausted_mark_the_engine_failed(cache_dir, tmp_path):
    """A worker that can no longer start (its model is gone) is retried max_restarts times; then every
    request gets a clean error saying why, and the engine reports itself unhealthy."""
    import shutil

    from engine.models import resolve_model_spec
    model_dir = tmp_path / "verify"
    shutil.copytree(resolve_model_spec("tiny-random/verify", cache_dir)[0], model_dir)
    sup = start_engine(tiny_config(cache_dir, "ar", verify_model=str(model_dir), max_restarts=2))
    try:
        shutil.rmtree(model_dir)
        os.kill(sup.worker_pids()["verify"], signal.SIGKILL)
        assert _wait(lambda: sup.fatal_error is not None, 120), "the engine kept restarting or gave no reason"
        assert "failed to restart 2 times" in sup.fatal_error
        assert not sup.is_healthy() and sup.health()["fatal_error"] == sup.fatal_error
        outputs = sup.generate(GenerationRequest(2, PROMPT, SamplingParams(max_tokens=5)), timeout_s=30)
        assert outputs[-1].finish_reason == "error" and outputs[-1].error == sup.fatal_error
    finally:
        sup.shutdown()


def test_missing_model_fails_fast_with_clear_error(tmp_path):
    config = EngineConfig(verify_model=str(tmp_path / "no-such-model"), mode="ar", cache_dir=str(tmp_path),
                          worker_start_timeout_s=120)
    start = time.monotonic()
    with pytest.raises(EngineStartError, match="no-such-model"):
        EngineSupervisor(config).start()
    assert time.monotonic() - start < 60


def test_shutdown_leaves_no_process_or_shared_memory(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "async"))
    pids = list(sup.worker_pids().values())
    shm_name = sup._state.name
    run(sup, PROMPT, max_tokens=5)
    sup.shutdown()
    sup.shutdown()   # idempotent
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert not os.path.exists(f"/dev/shm/{shm_name}")


def test_requests_after_shutdown_get_errors(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "ar"))
    sup.shutdown()
    outputs = []
    sup.submit(GenerationRequest(1, PROMPT, SamplingParams(max_tokens=5)), outputs.append)
    assert outputs and outputs[-1].finish_reason == "error"


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(temperature=float("nan"))])
def test_invalid_params_are_rejected_before_queueing(cache_dir, bad):
    sup = EngineSupervisor(tiny_config(cache_dir, "ar"))    # not started: validation needs no workers
    with pytest.raises(ValueError):
        sup.submit(GenerationRequest(1, PROMPT, SamplingParams(**bad)), lambda out: None)


def test_pair_with_different_vocabularies_is_refused(cache_dir, tmp_path):
    from transformers import Qwen2ForCausalLM

    from engine.tiny_models import _tiny_config, build_byte_tokenizer
    tokenizer = build_byte_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(7)])
    Qwen2ForCausalLM(_tiny_config(tokenizer, num_layers=1)).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    config = tiny_config(cache_dir, "sync", draft=str(tmp_path / "other"))
    with pytest.raises(EngineStartError, match="more than the verify"):
        EngineSupervisor(config).start()
