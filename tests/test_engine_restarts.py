"""Restarts with buffers shared at start-up, and request ids the workers never see (issue 11, items 7-8).

Async rejection sampling on CPU shares a q ring over the workers' start-up pipe, like a CUDA draft's
buffers: the two workers must restart together, on a fresh pipe, and leave no pipe or process behind.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from engine.messages import GenerationRequest, SamplingParams
from tests.engine_helpers import random_prompts, run, start_engine, tiny_config, wait_until as _wait

PROMPT = random_prompts(1, seed=9)[0]



def _num_open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _live_workers(role: str) -> list[mp.Process]:
    return [p for p in mp.active_children() if p.name == f"amusd-{role}" and p.is_alive()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_shared_ring_workers_restart_together_even_when_a_start_fails(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "async", sampling_scheme="rejection"))
    try:
        run(sup, PROMPT, max_tokens=8, temperature=1.0, seed=1)
        fds_before = _num_open_fds()
        first = sup.worker_pids()
        os.kill(first["draft"], signal.SIGKILL)
        # Both restart: the verify held the dead draft's ring.
        assert _wait(lambda: sup.worker_pids()["verify"] != first["verify"] and sup.worker_pids()["draft"]
                     not in (None, first["draft"]), 30), "the verify was not restarted with the draft"
        # Kill the new draft while it is still starting: that start fails, and the retry must again
        # start both on a fresh pipe (a lone new draft would hand its ring to nobody).
        second = sup.worker_pids()
        assert sup._workers["draft"].ready is None, "the draft finished starting before the test could kill it"
        os.kill(second["draft"], signal.SIGKILL)
        assert _wait(sup.is_healthy, 120), sup.health()
        third = sup.worker_pids()
        assert third["verify"] not in (first["verify"], second["verify"])
        assert not _is_running(second["verify"]), "the verify of the failed start was left running"
        assert len(_live_workers("verify")) == 1 and len(_live_workers("draft")) == 1
        # The new pair drafts through the new ring (the first request after a restart warms them up;
        # how much the draft contributes depends on timing, so count over a few requests).
        num_draft_tokens = 0
        for seed in range(2, 6):
            _, final = run(sup, PROMPT, max_tokens=48, temperature=1.0, seed=seed, ignore_eos=True)
            assert final.finish_reason == "length" and final.error is None
            num_draft_tokens += final.stats.num_draft_tokens
        assert num_draft_tokens > 0
        assert _num_open_fds() <= fds_before, "restarts leaked pipe ends or queues"
    finally:
        sup.shutdown()


@pytest.fixture(scope="module")
def async_engine(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "async"))
    yield sup
    sup.shutdown()


def test_callers_ids_do_not_reach_the_workers(async_engine):
    """Smaller, reused and previously cancelled caller ids still draft and run to the end."""
    expected, _ = run(async_engine, PROMPT, max_tokens=64, ignore_eos=True)
    outputs = []
    async_engine.submit(GenerationRequest(1000, PROMPT, SamplingParams(max_tokens=400, ignore_eos=True)),
                        outputs.append)
    assert _wait(lambda: len(outputs) > 0, 30)
    async_engine.cancel(1000)
    assert _wait(lambda: any(o.finished for o in outputs), 30)
    assert outputs[-1].finish_reason == "cancelled"
    for caller_id in (1000, 1, 1):      # the cancelled id again, then a smaller one, twice
        results = async_engine.generate(GenerationRequest(caller_id, PROMPT, SamplingParams(max_tokens=64,
                                                                                            ignore_eos=True)), 60)
        final = results[-1]
        assert final.request_id == caller_id and final.finish_reason == "length"
        assert [t for o in results for t in o.token_ids] == expected
        assert final.stats.num_draft_tokens > 0, f"caller id {caller_id} switched drafting off"
