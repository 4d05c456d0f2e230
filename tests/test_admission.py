"""engine/admission.py and engine/kv_budget.py without torch or processes: places, the KV budget, FCFS."""
from __future__ import annotations

import pytest

from engine.admission import Admission, LineFull
from engine.kv_budget import GiB, KVBudget, available_host_bytes, kv_bytes_per_token, kv_tokens_needed
from engine.messages import GenerationRequest, SamplingParams

MAX_MODEL_LEN = 1000


def _request(request_id: int, num_prompt_tokens: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id, [1] * num_prompt_tokens, SamplingParams(max_tokens=max_tokens))


def _line(max_num_running: int, kv_budget_tokens: int | None) -> Admission:
    line = Admission(MAX_MODEL_LEN)
    line.max_num_running, line.kv_budget_tokens = max_num_running, kv_budget_tokens
    return line


def _start_all_startable(line: Admission, started: list[int]) -> None:
    while (waiting := line.take_startable()) is not None:
        line.place(waiting.request.request_id, waiting)
        started.append(waiting.request.request_id)


def test_places_limit_how_many_run_and_the_line_keeps_its_order():
    line, started = _line(2, None), []
    for rid in (1, 2, 3):
        line.put(_request(rid, 10, 10), print)
    _start_all_startable(line, started)
    assert started == [1, 2] and line.num_waiting == 1
    line.remove(1)
    _start_all_startable(line, started)
    assert started == [1, 2, 3] and line.num_waiting == 0


def test_a_request_starts_only_when_its_kv_fits_and_nobody_overtakes_it():
    line, started = _line(8, 100), []
    for rid, (prompt, max_tokens) in enumerate([(40, 20), (10, 20), (20, 30), (5, 5)], start=1):
        line.put(_request(rid, prompt, max_tokens), print)        # reservations 60, 30, 50, 10
    _start_all_startable(line, started)
    assert started == [1, 2]                       # 90 reserved: 50 does not fit, and 10 waits behind it
    assert line.num_kv_tokens_reserved == 90 and line.num_waiting == 2
    assert line.kv_usage() == {"budget_tokens": 100, "reserved_tokens": 90}
    line.remove(1)
    _start_all_startable(line, started)
    assert started == [1, 2, 3, 4] and line.num_kv_tokens_reserved == 90


def test_a_cancelled_request_waiting_for_room_is_handed_back_at_once():
    line, started = _line(2, 100), []
    for rid, (prompt, max_tokens) in enumerate([(40, 40), (30, 30), (5, 5)], start=1):
        line.put(_request(rid, prompt, max_tokens), print)           # 80, then 60 waits for room
    _start_all_startable(line, started)
    assert started == [1] and line.take_startable() is None
    request = line.take_startable(is_cancelled=lambda rid: rid == 2).request
    assert request.request_id == 2 and line.num_waiting == 1         # for the caller to answer, not to start
    _start_all_startable(line, started)
    assert started == [1, 3]


def test_the_line_refuses_only_when_max_queue_size_already_wait_beyond_the_free_places():
    line, started = Admission(MAX_MODEL_LEN, max_num_waiting=2), []
    line.max_num_running = 3
    for rid in range(1, 6):                              # 3 free places + 2 waiting
        line.put(_request(rid, 10, 10), print)
    with pytest.raises(LineFull):
        line.put(_request(6, 10, 10), print)
    _start_all_startable(line, started)
    assert started == [1, 2, 3] and line.num_waiting == 2
    with pytest.raises(LineFull):                        # no place is free now: 2 already wait
        line.put(_request(7, 10, 10), print)
    line.remove(1)                                       # a place frees up: one more may join
    line.put(_request(8, 10, 10), print)
    _start_all_startable(line, started)
    assert started == [1, 2, 3, 4] and line.num_waiting == 2
    unbounded = Admission(MAX_MODEL_LEN)
    for rid in range(100):
        unbounded.put(_request(rid, 10, 10), print)
    assert unbounded.num_waiting == 100


def test_a_waiting_request_leaves_the_line_from_any_place_and_on_start_runs_when_placed():
    line, events = Admission(MAX_MODEL_LEN, max_num_waiting=8), []
    for rid in (1, 2, 3):
        line.put(_request(rid, 10, 10), print, on_start=lambda rid=rid: events.append(rid))
    assert line.drop(2).request.request_id == 2 and line.drop(2) is None and line.num_waiting == 2
    assert line.wait_for_arrival(timeout_s=0.0) and events == []
    started = []
    _start_all_startable(line, started)
    assert started == [1] and events == [1]              # one place: the next waits, not started
    line.remove(1)
    _start_all_startable(line, started)
    assert started == [1, 3] and events == [1, 3] and line.take() is None
    assert not line.wait_for_arrival(timeout_s=0.01)


def test_a_request_alone_may_use_the_whole_budget_and_one_over_it_is_refused():
    line, started = _line(4, 100), []
    line.check_fits(_request(1, 50, 50))
    line.put(_request(1, 50, 50), print)
    _start_all_startable(line, started)
    assert started == [1]
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        line.check_fits(_request(2, 50, 51))
    _line(1, None).check_fits(_request(3, 900, 900))       # no budget: one request at a time, any length
    line, started = _line(4, None), []
    line.put(_request(4, 50, 60), print)                   # in line before the budget was known
    line.kv_budget_tokens = 100
    _start_all_startable(line, started)
    assert started == [4], "a request alone always starts: the line must never stall"


def test_reservations_are_capped_by_the_context_and_shutdown_takes_the_one_waiting_for_room():
    assert kv_tokens_needed(900, 500, MAX_MODEL_LEN) == MAX_MODEL_LEN
    assert kv_tokens_needed(10, 5, MAX_MODEL_LEN) == 15
    line, started = _line(4, 1500), []
    for rid in (1, 2):
        line.put(_request(rid, 900, 500), print)
    _start_all_startable(line, started)
    assert started == [1] and line.num_waiting == 1        # 1000 + 1000 > 1500: the second waits for room
    assert line.take().request.request_id == 2 and line.num_waiting == 0


def test_the_budget_plan():
    per_token = kv_bytes_per_token(num_layers=28, num_kv_heads=2, head_dim=128, element_size=2)
    assert per_token == 28 * 2 * 2 * 128 * 2
    explicit = KVBudget.plan(1.0, 8, 2048, per_token, available_bytes=10 * GiB)
    assert explicit.num_tokens == GiB // per_token and "kv_cache_memory_gb" in explicit.reason
    roomy = KVBudget.plan(0, 8, 2048, per_token, available_bytes=20 * GiB)
    assert roomy.num_tokens == 8 * 2048                            # max_num_seqs full contexts
    tight = KVBudget.plan(0, 8, 32768, per_token, available_bytes=4 * GiB)
    assert tight.num_tokens == 2 * GiB // per_token < 8 * 32768    # half of what is available
    tiny = KVBudget.plan(0, 8, 32768, per_token, available_bytes=GiB // 8)
    assert tiny.num_tokens == 32768                                # never less than one full context
    assert KVBudget.plan(0, 4, 100, per_token, available_bytes=None).num_tokens == 400
    assert roomy.as_runtime()["kv_budget_tokens"] == roomy.num_tokens


def test_available_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   12000000 kB\n")
    assert available_host_bytes(str(meminfo)) == 12000000 * 1024
    assert available_host_bytes(str(tmp_path / "missing")) is None
