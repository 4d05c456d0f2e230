"""engine/async_batch.py in one process: async speculation with continuous batching gives every
request what it gets alone (`ar`), whatever the interleaving of the two workers' steps.

The verify's BatchDecoder (with SharedDrafts) and the draft's AsyncBatchDrafter share one
SharedState with a row per sequence; a seeded schedule runs 0..3 draft steps between verify steps,
so the draft is sometimes ahead, sometimes behind, and the random draft model disagrees with the
verify often (rollbacks in most rows). Float64 tiny models.
"""
from __future__ import annotations

import random

import pytest

from engine.async_batch import AsyncBatchDrafter, SharedDrafts
from engine.batch_decode import BatchDecoder
from engine.cost_model import SpeculationBudget
from engine.decoding import Verifier, new_sequence
from engine.kv_budget import KVBudget
from engine.messages import RequestDone, SamplingParams, StartRequest
from engine.models import ModelRunner
from engine.shared_state import Ctrl, SharedState
from tests.test_batch_decode import CHUNK, MAX_MODEL_LEN, _alone, _assert_each_as_alone, _collect, _requests


class Pair:
    """Both workers' halves over one shared segment, stepped by hand."""

    def __init__(self, model, draft_model, max_num_seqs: int, num_to_check: int = 4, lookup_ngram: int = 0,
                 max_draft_lead: int = 6):
        self.state = SharedState.create(MAX_MODEL_LEN, max_num_seqs)
        verifier = Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"),
                            SpeculationBudget(None, 8, num_fixed=num_to_check))
        self.batch = BatchDecoder(verifier, max_num_seqs, CHUNK, True, KVBudget(100_000, 1, "test"), 64,
                                  SharedDrafts(self.state, 100, lookup_ngram))
        self.drafter = AsyncBatchDrafter(ModelRunner(draft_model, "cpu", decoder_impl="lean"), self.state,
                                         max_draft_lead, MAX_MODEL_LEN, CHUNK, 64, wait_timeout_s=60)

    def close(self):
        self.state.close()


def _assert_invariant_i(state: SharedState) -> None:
    """engine/async_decode.py's invariant, per row: while DRAFT_EPOCH == EPOCH the draft's tokens
    agree with the commit wherever both exist."""
    for slot in state.slots:
        if slot.get(Ctrl.REQUEST_ID) and slot.get(Ctrl.DRAFT_EPOCH) == slot.get(Ctrl.EPOCH):
            n = min(slot.get(Ctrl.NUM_DRAFTED), slot.get(Ctrl.NUM_COMMITTED))
            assert (slot.draft_tokens[:n] == slot.committed_tokens[:n]).all()


def _run_interleaved(pair: Pair, requests, seed: int) -> tuple[list, int]:
    """Requests join mid-flight (the draft gets its StartRequest before or after the verify admits
    it); request 6 is cancelled once it has 5 tokens; 0..3 draft steps between verify steps."""
    rng = random.Random(seed)
    batch, drafter = pair.batch, pair.drafter
    outputs, waiting, num_steps, max_batch = [], list(requests), 0, 0
    late_starts = []
    while waiting or batch.is_busy:
        if waiting and len(batch.running) < batch.max_num_seqs and num_steps % 2 == 0:
            req = waiting.pop(0)
            if rng.random() < 0.5:
                drafter.add(req)
            else:
                late_starts.append(req)
            batch.admit(new_sequence(req, [], MAX_MODEL_LEN, "coupled"))
        if 6 in batch.running and len(batch.running[6].seq.output_ids) >= 5:
            batch.cancel(6)
        for _ in range(rng.randrange(4)):
            if late_starts and rng.random() < 0.5:
                drafter.add(late_starts.pop(0))
            drafter.step()
            _assert_invariant_i(pair.state)
        if batch.is_busy:
            batch.step(outputs.append)
            _assert_invariant_i(pair.state)
        max_batch = max(max_batch, len(batch.running))
        num_steps += 1
    return outputs, max_batch


@pytest.mark.parametrize("seed", [0, 1])
def test_async_batch_gives_every_request_what_it_gets_alone(model, draft_model, seed):
    requests = _requests(model.config.vocab_size)
    pair = Pair(model, draft_model, 4)
    try:
        outputs, max_batch = _run_interleaved(pair, requests, seed)
        assert max_batch == 4
        _assert_each_as_alone(_collect(outputs), _alone(model, requests), requests)
        stats = [out.stats for out in outputs if isinstance(out, RequestDone)]
        assert sum(st.num_accepted_tokens for st in stats) > 0, "draft tokens must be accepted"
        assert sum(st.num_rollbacks for st in stats) > 0, "the random draft must be rolled back"
        assert sum(st.num_draft_tokens_produced for st in stats) > 0
        # every row is free again, and the draft follows: it holds nothing once it has looked
        assert all(slot.get(Ctrl.REQUEST_ID) == 0 for slot in pair.state.slots)
        pair.drafter.step()
        assert not pair.drafter.is_busy
    finally:
        pair.close()


def test_verify_lookup_guesses_ride_along_in_the_batch(model, draft_model):
    """n-gram guesses after each row's draft tokens (repetitive prompts, so they hit) stay lossless."""
    rng = random.Random(3)
    vocab = model.config.vocab_size
    motif = [rng.randrange(vocab) for _ in range(6)]
    requests = [StartRequest(i + 1, motif * 5 + [rng.randrange(vocab)], SamplingParams(max_tokens=25, ignore_eos=True))
                for i in range(3)]
    pair = Pair(model, draft_model, 3, num_to_check=6, lookup_ngram=3)
    try:
        outputs, _ = _run_interleaved(pair, requests, seed=5)
        got, want = _collect(outputs), _alone(model, requests)
        assert {rid: g["tokens"] for rid, g in got.items()} == {rid: w["tokens"] for rid, w in want.items()}
        assert sum(out.stats.num_lookup_tokens for out in outputs if isinstance(out, RequestDone)) > 0
    finally:
        pair.close()


def test_a_start_the_draft_receives_after_its_request_finished_is_dropped(model, draft_model):
    pair = Pair(model, draft_model, 2)
    try:
        req = StartRequest(1, [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
        pair.batch.admit(new_sequence(req, [], MAX_MODEL_LEN, "coupled"))
        outputs = []
        while pair.batch.is_busy:
            pair.batch.step(outputs.append)
        pair.drafter.add(req)                       # the draft's queue was slow: the request is already over
        pair.drafter.step()
        assert not pair.drafter.is_busy
        # the next request takes the freed row and the draft starts it there
        nxt = StartRequest(2, [9, 9, 9, 9], SamplingParams(max_tokens=8, ignore_eos=True))
        pair.drafter.add(nxt)
        pair.batch.admit(new_sequence(nxt, [], MAX_MODEL_LEN, "coupled"))
        pair.drafter.step()
        assert [row.request_id for row in pair.drafter.rows.values()] == [2]
    finally:
        pair.close()


# ---- through the supervisor and live workers ---------------------------------------------------

@pytest.mark.parametrize("victim", ["draft", "verify"])
def test_the_engine_batches_async_requests_each_gets_what_ar_gives_and_survives_a_kill(session_cache_dir, victim):
    from tests.engine_helpers import random_prompts, run, start_engine, tiny_config, wait_until
    from tests.test_batch_decode import _largest_batch, _submit_all, kill_mid_batch
    prompts = random_prompts(6, seed=11)
    params = dict(max_tokens=24, temperature=0.7, seed=4, ignore_eos=True)
    ar = start_engine(tiny_config(session_cache_dir, "ar"))
    try:
        expected = [run(ar, p, **params)[0] for p in prompts]
    finally:
        ar.shutdown()
    # prefill_cores = the verify's core: no wide passes, so the draft's tokens are checked whatever this
    # machine's measured costs say (where wide passes win, a stream may never check one: CI saw 0 accepted)
    sup = start_engine(tiny_config(session_cache_dir, "async", max_num_seqs=3, prefill_cores="0"))
    try:
        assert sup.max_num_running == 3 and sup.health()["workers"]["verify"]["max_num_seqs"] == 3
        outputs = _submit_all(sup, prompts, **params)
        assert wait_until(lambda: all(o and o[-1].finished for o in outputs.values()), 60)
        assert [[t for o in outs for t in o.token_ids] for outs in outputs.values()] == expected
        stats = [outs[-1].stats for outs in outputs.values()]
        assert _largest_batch(stats) == 3
        assert sum(st.num_draft_tokens_produced for st in stats) > 0 and sum(st.num_accepted_tokens for st in stats) > 0
        # kill -9 one worker mid-batch: the running requests end with an error, the engine comes back
        kill_mid_batch(sup, victim, _submit_all(sup, prompts[:4], max_tokens=400, ignore_eos=True), 3)
        assert wait_until(sup.is_healthy, 60)
        again = _submit_all(sup, prompts[:4], **params)
        assert wait_until(lambda: all(o and o[-1].finished for o in again.values()), 60)
        assert [[t for o in outs for t in o.token_ids] for outs in again.values()] == expected[:4]
        assert sup.num_waiting == 0 and sup.health()["kv_cache"]["reserved_tokens"] == 0
    finally:
        sup.shutdown()


# ---- wide passes: the draft steps aside when speculation beside it would not pay -----------------

def test_the_cost_model_goes_wide_for_a_full_compute_bound_batch_and_speculates_for_one_stream():
    from engine.cost_model import ForwardCosts, prefer_wide_pass
    # AVX512_BF16 EPYC, 1.5B int8 (README): narrow = one core, wide = two; the 0.5B draft on one core
    narrow = ForwardCosts((0.097, 0.113, 0.14, 0.166, 0.19, 0.22, 0.25, 0.29, 0.32))
    wide = ForwardCosts((0.064, 0.075, 0.09, 0.114, 0.13, 0.15, 0.165, 0.183, 0.2))
    draft = ForwardCosts((0.048, 0.047, 0.05, 0.054, 0.06))
    assert prefer_wide_pass(narrow, wide, draft, [(1, 0.7)] * 8)                 # 8 streams: as ar batched
    assert not prefer_wide_pass(narrow, wide, draft, [(4, 0.9)])                 # one stream the draft reads well
    flat = ForwardCosts((0.02,) * 9)                                             # a memory-bound verify (a GPU)
    assert not prefer_wide_pass(flat, ForwardCosts((0.018,) * 9), ForwardCosts((0.005,) * 5), [(4, 0.7)] * 8)


def test_one_stream_sizes_its_proposals_by_the_curve_it_runs_at_beside_the_draft():
    """Measured (AVX512_BF16 EPYC, session 10): alone, checking 3 more tokens cost the verify 1.26x
    c(1); beside the draft 2.1x. Sized by the alone curve, a 0.5-acceptance stream asked for 3 and
    the wide rule, pricing 3 beside the draft, sent 43 of 50 passes wide, the draft paused (so the
    acceptance never moved again); sized by the narrow curve it checks 1 and stays beside the draft."""
    from engine.cost_model import ForwardCosts
    alone = ForwardCosts((0.098, 0.108, 0.123, 0.123, 0.187, 0.187, 0.207, 0.226, 0.226))
    narrow = ForwardCosts((0.097, 0.106, 0.169, 0.207, 0.207, 0.207, 0.209, 0.229, 0.258))
    wide = ForwardCosts((0.089, 0.094, 0.094, 0.094, 0.094, 0.122, 0.122, 0.124, 0.132))
    state = SharedState.create(64, 2)
    try:
        shared = SharedDrafts(state, 9, wide=RecordingPlacement())
        shared.use_costs(narrow, wide, ForwardCosts((0.035, 0.036, 0.038, 0.038, 0.042)))
        seq = new_sequence(StartRequest(1, [5, 6, 7], SamplingParams(max_tokens=8)), [], 64, "coupled")
        seq.budget = SpeculationBudget(alone, 8, acceptance_prior=0.5)
        assert seq.budget.num_to_check() == 3
        shared.start(seq)
        assert seq.budget.num_to_check() == 1
        assert not shared._prefers_wide([type("Run", (), {"seq": seq})()], 0)
        shared.finish(seq)
    finally:
        state.close()


class RecordingPlacement:
    """Stands in for PrefillPlacement: records when passes run widened."""

    def __init__(self):
        self.is_widened, self.num_widenings = False, 0

    def widened(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            self.is_widened, self.num_widenings = True, self.num_widenings + 1
            try:
                yield
            finally:
                self.is_widened = False
        return scope()


def test_a_full_batch_runs_wide_with_the_draft_paused_and_every_request_gets_what_it_gets_alone(model, draft_model):
    from engine.cost_model import ForwardCosts
    from engine.shared_state import is_draft_paused
    requests = _requests(model.config.vocab_size)
    pair = Pair(model, draft_model, 4)
    placement = RecordingPlacement()
    pair.batch.drafter.wide = placement
    # speculation beside the draft pays for one or two streams, not for three or four
    # (4 proposed tokens a row: one row costs c(5), two c(10), three c(15) = 11 beside the draft)
    pair.batch.drafter.use_costs(ForwardCosts((1.0,) * 10 + (3.0, 5.0)),
                                 ForwardCosts((0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)), ForwardCosts((0.01,) * 5))
    seen = {"wide_passes": 0, "narrow_passes": 0, "drafted_while_paused": 0}
    step = pair.drafter.step

    def draft_step():
        before = {row.request_id: row.num_drafted_total for row in pair.drafter.rows.values()}
        was_paused = is_draft_paused(pair.state)
        step()
        if was_paused:
            seen["drafted_while_paused"] += sum(row.num_drafted_total - before.get(row.request_id, 0)
                                                for row in pair.drafter.rows.values())
    pair.drafter.step = draft_step
    verify_step = pair.batch.step

    def batch_step(emit):
        verify_step(emit)
        seen["wide_passes" if placement.is_widened else "narrow_passes"] += 1
        assert placement.is_widened == is_draft_paused(pair.state)
    pair.batch.step = batch_step
    try:
        outputs, _ = _run_interleaved(pair, requests, seed=2)
        _assert_each_as_alone(_collect(outputs), _alone(model, requests), requests)
        assert seen["wide_passes"] > 0 and seen["narrow_passes"] > 0 and placement.num_widenings > 0
        assert seen["drafted_while_paused"] == 0
        assert not placement.is_widened and not is_draft_paused(pair.state)     # idle: narrow, the draft free
        stats = [out.stats for out in outputs if isinstance(out, RequestDone)]
        assert sum(st.num_accepted_tokens for st in stats) > 0
        assert 0 < sum(st.num_wide_steps for st in stats) < sum(st.num_verify_steps for st in stats)
    finally:
        pair.close()


def test_a_long_prompt_is_prefilled_wide_and_without_costs_or_cores_nothing_widens():
    state = SharedState.create(64, 2)
    try:
        shared = SharedDrafts(state, 9, wide=RecordingPlacement())
        assert shared._prefers_wide([], 64) and not shared._prefers_wide([], 63)   # engine/models.py's threshold
        assert not SharedDrafts(state, 9)._prefers_wide([], 500)                  # no other cores to widen onto
    finally:
        state.close()


def test_bench_sends_a_batch_method_its_prompts_at_once_and_each_gets_what_ar_gets_alone(session_cache_dir):
    """`amusd bench --methods ar,async@3`: the real-pair batch-invariance check, here on the tiny pair."""
    from engine.bench import batch_of, build_parser, parse_method, run_engine_method
    from tests.engine_helpers import random_prompts
    assert (parse_method("async@8"), batch_of("async@8"), batch_of("ar:1"), parse_method("ar:1@4")) == \
        (("async", 2), 8, 1, ("ar", 1))
    for bad in ("hf@2", "ar@x", "ar@0"):
        with pytest.raises(SystemExit):
            parse_method(bad)
    args = build_parser().parse_args(["--verify-model", "tiny-random/verify", "--draft-model", "tiny-random/draft",
                                      "--dtype", "float64", "--max-model-len", "512"])
    prompts = random_prompts(4, seed=3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = run_engine_method(args, "ar", 1, prompts, params)
    batched = run_engine_method(args, "async", 2, prompts, params, batch=3)
    assert [s["token_ids"] for s in batched] == [s["token_ids"] for s in alone]
    assert max(size for s in batched for size, n in enumerate(s["stats"]["num_passes_by_batch_size"], 1) if n) == 3


def test_wide_steps_are_exported_as_a_counter():
    from engine.messages import RequestStats
    from server.metrics import ServerMetrics
    metrics = ServerMetrics()
    metrics.record_finished("length", 1.0, RequestStats(num_verify_steps=5, num_wide_steps=3))
    assert "amusd:spec_decode_num_wide_steps_total 3.0" in metrics.render().decode()
