"""engine/batch_decode.py in one process: continuous batching gives every request what it gets alone.

Float64 tiny verify model. Requests of different prompt lengths (one longer than a prefill chunk)
and lengths join mid-flight, greedy and seeded ones, with logprobs, prompt logprobs, a stop token
and penalties; one is cancelled mid-batch. Each must produce exactly the tokens (and logprobs) it
produces alone through run_decode with no proposer (`ar`).
"""
from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from engine.batch_decode import BatchDecoder, batch_decoder_for
from engine.batch_draft import BatchDrafter
from engine.config import EngineConfig
from engine.cost_model import ForwardCosts, SpeculationBudget
from engine.decoding import Verifier, new_sequence, run_decode
from engine.kv_budget import KVBudget
from engine.messages import GenerationRequest, RequestDone, SamplingParams, StartRequest, TokensOut
from engine.models import ModelRunner
from engine.proposers import LocalDraftProposer, NoProposer, Proposal
from engine.tiny_models import ensure_tiny_model

MAX_MODEL_LEN = 1024
CHUNK = 64


def _requests(vocab: int) -> list[StartRequest]:
    rng = random.Random(4)
    prompt = lambda n: [rng.randrange(vocab) for _ in range(n)]            # noqa: E731
    params = [SamplingParams(max_tokens=30, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=25, num_logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=20, num_prompt_logprobs=1, ignore_eos=True),
              SamplingParams(max_tokens=18, temperature=0.7, seed=3, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=200, ignore_eos=True),                 # cancelled mid-batch
              SamplingParams(max_tokens=40, stop_token_ids=[7, 8, 9, 10, 11, 12]),
              SamplingParams(max_tokens=9, presence_penalty=0.5, ignore_eos=True)]
    lengths = [5, 1, 40, 3 * CHUNK + 10, 17, 8, 12, 2]
    return [StartRequest(i + 1, prompt(n), p) for i, (n, p) in enumerate(zip(lengths, params))]


def _verifier(model) -> Verifier:
    return Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"),
                    SpeculationBudget(None, 8))


def _batch(model, max_num_seqs: int, kv_budget_tokens: int = 100_000, max_num_batched_tokens: int = 64) -> BatchDecoder:
    return BatchDecoder(_verifier(model), max_num_seqs, CHUNK, True, KVBudget(kv_budget_tokens, 1, "test"),
                        max_num_batched_tokens)


def _collect(outputs: list) -> dict[int, dict]:
    by_request: dict[int, dict] = {}
    for out in outputs:
        entry = by_request.setdefault(out.request_id, {"tokens": [], "logprobs": [], "prompt": None, "done": None})
        if isinstance(out, TokensOut):
            entry["tokens"] += out.token_ids
            entry["logprobs"] += [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs or []]
            entry["prompt"] = entry["prompt"] or out.prompt_logprobs
        elif isinstance(out, RequestDone):
            entry["done"] = out.finish_reason
    return by_request


def _alone(model, requests) -> dict[int, dict]:
    """What each request gets alone, through run_decode with no proposer (`ar`)."""
    outputs = []
    for req in requests:
        seq = new_sequence(req, [], MAX_MODEL_LEN, "coupled")
        run_decode(seq, _verifier(model), NoProposer(), outputs.append, lambda: False)
        outputs.append(RequestDone(req.request_id, seq.finish_reason, seq.stats))
    return _collect(outputs)


def _run_joining(batch: BatchDecoder, requests) -> tuple[list, int]:
    """Requests join mid-flight (one at every other step, while there is room); request 6 is
    cancelled once it has 5 tokens, while others run beside it. (outputs, the largest batch)."""
    outputs, waiting, num_steps, max_batch = [], list(requests), 0, 0
    while waiting or batch.is_busy:
        if waiting and len(batch.running) < batch.max_num_seqs and num_steps % 2 == 0:
            batch.admit(new_sequence(waiting.pop(0), [], MAX_MODEL_LEN, "coupled"))
        if 6 in batch.running and len(batch.running[6].seq.output_ids) >= 5:
            batch.cancel(6)
        if batch.is_busy:
            batch.step(outputs.append)
        max_batch = max(max_batch, len(batch.running))
        num_steps += 1
    return outputs, max_batch


def _assert_each_as_alone(got: dict, expected: dict, requests) -> None:
    assert got[6]["done"] == "cancelled" and got[6]["tokens"] == expected[6]["tokens"][:len(got[6]["tokens"])]
    assert 0 < len(got[6]["tokens"]) < 200
    assert expected[7]["done"] == got[7]["done"]
    for rid, want in expected.items():
        if rid == 6:
            continue
        assert got[rid]["tokens"] == want["tokens"], f"request {rid} differs when batched"
        assert got[rid]["done"] == want["done"]
        for (t1, lp1, top1), (t2, lp2, top2) in zip(got[rid]["logprobs"], want["logprobs"], strict=True):
            assert t1 == t2 and lp1 == pytest.approx(lp2, abs=1e-9) and [t for t, _ in top1] == [t for t, _ in top2]
    prompt_got, prompt_want = got[4]["prompt"], expected[4]["prompt"]
    assert len(prompt_got) == len(prompt_want) == len(requests[3].prompt_token_ids)
    for a, b in zip(prompt_got[1:], prompt_want[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-9)


def test_every_request_gets_what_it_gets_alone(model):
    requests = _requests(model.config.vocab_size)
    outputs, max_batch = _run_joining(_batch(model, 4), requests)
    assert max_batch == 4, "the batch must fill up"
    _assert_each_as_alone(_collect(outputs), _alone(model, requests), requests)


def test_sync_drafts_and_verifies_the_whole_batch_and_each_request_gets_what_it_gets_alone(model, draft_model):
    """sync with batching (engine/batch_draft.py): k = 3 draft tokens per sequence per step, the
    draft's rounds and the verify's pass over all of them; rejections roll back each sequence's
    own KV in both models. The long prompt (3 chunks) catches up in the draft a chunk per step."""
    requests = _requests(model.config.vocab_size)
    verifier = Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"),
                        SpeculationBudget(None, 8, num_fixed=3))
    drafter = BatchDrafter(ModelRunner(draft_model, "cpu", decoder_impl="lean"), max_catch_up=CHUNK, max_verify_rows=100)
    batch = BatchDecoder(verifier, 4, CHUNK, True, KVBudget(100_000, 1, "test"), 64, drafter)
    outputs, max_batch = _run_joining(batch, requests)
    assert max_batch == 4
    _assert_each_as_alone(_collect(outputs), _alone(model, requests), requests)
    stats = {out.request_id: out.stats for out in outputs if isinstance(out, RequestDone)}
    assert sum(st.num_accepted_tokens for st in stats.values()) > 0 and sum(st.num_rollbacks for st in stats.values()) > 0
    # the same drafts as sync alone (request 4's long prompt catches up in the draft first; 6 is cancelled)
    for req in requests:
        if req.request_id in (4, 6):
            continue
        seq = new_sequence(req, [], MAX_MODEL_LEN, "coupled")
        run_decode(seq, Verifier(ModelRunner(model, "cpu", decoder_impl="lean"), SpeculationBudget(None, 8, num_fixed=3)),
                   LocalDraftProposer(ModelRunner(draft_model, "cpu", decoder_impl="lean")), lambda out: None, lambda: False)
        got = stats[req.request_id]
        assert (got.num_draft_tokens, got.num_accepted_tokens, got.num_verify_steps) == \
            (seq.stats.num_draft_tokens, seq.stats.num_accepted_tokens, seq.stats.num_verify_steps), req.request_id


def test_a_full_sync_batch_speculates_only_as_far_as_the_verify_curve_goes(draft_model):
    drafter = BatchDrafter(ModelRunner(draft_model, "cpu", decoder_impl="lean"), max_catch_up=CHUNK, max_verify_rows=9)
    proposals = [Proposal(k) for k in (3, 3, 3, 1)]                      # 4 + 10 = 14 verify rows
    drafter._fit_verify_rows(proposals)
    assert [p.num_to_check for p in proposals] == [1, 1, 2, 1]           # 9 rows, the largest cut first
    proposals = [Proposal(3) for _ in range(8)] + [Proposal(0)]
    drafter._fit_verify_rows(proposals)
    assert sum(p.num_to_check for p in proposals) == 0                  # 9 sequences: no room to speculate


def test_a_full_sync_batch_runs_as_ar_and_leaves_the_draft_idle(model, draft_model):
    requests = [req for req in _requests(model.config.vocab_size) if req.request_id in (1, 3, 5)]
    verifier = Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"),
                        SpeculationBudget(None, 8, num_fixed=3))
    drafter = BatchDrafter(ModelRunner(draft_model, "cpu", decoder_impl="lean"), max_catch_up=CHUNK, max_verify_rows=3)
    batch, outputs = BatchDecoder(verifier, 3, CHUNK, True, KVBudget(100_000, 1, "test"), 64, drafter), []
    for req in requests:
        batch.admit(new_sequence(req, [], MAX_MODEL_LEN, "coupled"))
    batch.step(outputs.append)                                            # prefill
    for _ in range(5):
        batch.step(outputs.append)
        assert all(run.draft_slot.num_cached == 0 for run in batch.running.values()), "no draft work without room"
    assert all(run.seq.stats.num_draft_tokens == 0 for run in batch.running.values())
    while batch.is_busy:
        batch.step(outputs.append)
    got, expected = _collect(outputs), _alone(model, requests)
    assert {rid: got[rid]["tokens"] for rid in expected} == {rid: want["tokens"] for rid, want in expected.items()}


@pytest.mark.parametrize("verify_costs, is_drafting", [
    (tuple(0.058 * k for k in range(1, 10)), False),     # k rows cost k x one (AVX2 bf16): 3 rows as ar
    ((0.058,) * 9, True)])                                # rows for free: draft
def test_a_sync_batch_drafts_only_where_the_cost_model_says_it_pays(model, draft_model, verify_costs, is_drafting):
    requests = [req for req in _requests(model.config.vocab_size) if req.request_id in (1, 3, 5)]
    budget = SpeculationBudget(ForwardCosts(verify_costs), 8, 0, ForwardCosts((0.027, 0.028, 0.029)))
    verifier = Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"), budget)
    drafter = BatchDrafter(ModelRunner(draft_model, "cpu", decoder_impl="lean"), max_catch_up=CHUNK, max_verify_rows=100)
    batch, outputs = BatchDecoder(verifier, 3, CHUNK, True, KVBudget(100_000, 1, "test"), 64, drafter), []
    propose, drafted = drafter.propose, []                                # (rows, tokens drafted) per step
    drafter.propose = lambda runs, *args: (lambda out: drafted.append(
        (len(runs), sum(len(p.draft_ids) for p in out.values()))) or out)(propose(runs, *args))
    for req in requests:
        batch.admit(new_sequence(req, [], MAX_MODEL_LEN, "coupled"))
    while batch.is_busy:
        batch.step(outputs.append)
    full_steps = [num_drafted for num_rows, num_drafted in drafted if num_rows == 3]
    assert len(full_steps) > 3 and (sum(full_steps) > 0) == is_drafting
    stats = [out.stats for out in outputs if isinstance(out, RequestDone)]
    assert (sum(st.num_wide_steps for st in stats) >= len(full_steps)) != is_drafting
    got, expected = _collect(outputs), _alone(model, requests)
    assert {rid: got[rid]["tokens"] for rid in expected} == {rid: want["tokens"] for rid, want in expected.items()}


def test_a_long_prompt_is_prefilled_in_chunks_beside_running_streams(model):
    """While a long prompt prefills, a running stream still gets a token at every pass and no pass
    holds more than max_num_batched_tokens tokens; with nobody decoding, chunks of prefill_chunk_tokens."""
    requests = _requests(model.config.vocab_size)
    long = StartRequest(99, [i % 200 for i in range(5 * CHUNK)], SamplingParams(max_tokens=3, ignore_eos=True))
    batch, outputs, pass_sizes = _batch(model, 2, max_num_batched_tokens=17), [], []
    forward_batch = batch.decoder.forward_batch
    batch.decoder.forward_batch = lambda rows: pass_sizes.append(sum(len(ids) for _, ids in rows)) or forward_batch(rows)
    batch.admit(new_sequence(requests[0], [], MAX_MODEL_LEN, "coupled"))
    batch.step(outputs.append)
    batch.admit(new_sequence(long, [], MAX_MODEL_LEN, "coupled"))
    while batch.running[99].slot.num_cached < 5 * CHUNK - 1:            # all but the pending token
        before = len(outputs)
        batch.step(outputs.append)
        assert [o.request_id for o in outputs[before:]] == [requests[0].request_id]
    assert max(pass_sizes[1:]) == 17 and len(pass_sizes) == 1 + -(-(5 * CHUNK - 1) // 16)
    batch.step(outputs.append)
    assert any(o.request_id == 99 for o in outputs)
    alone, pass_sizes[:] = _batch(model, 2, max_num_batched_tokens=17), []
    alone_forward = alone.decoder.forward_batch
    alone.decoder.forward_batch = lambda rows: pass_sizes.append(sum(len(ids) for _, ids in rows)) or alone_forward(rows)
    alone.admit(new_sequence(long, [], MAX_MODEL_LEN, "coupled"))
    alone.step(outputs.append)
    assert pass_sizes == [CHUNK]


def test_in_sync_a_joining_prompt_gets_what_the_draft_tokens_leave_of_max_num_batched_tokens(model, draft_model):
    """A decoding sequence's row in sync is its pending token + its k draft tokens: the prompt
    prefilled beside it gets max_num_batched_tokens minus all of them, so no pass holds more."""
    stream = StartRequest(1, [5, 6, 7], SamplingParams(max_tokens=300, ignore_eos=True))
    long = StartRequest(99, [i % 200 for i in range(3 * CHUNK)], SamplingParams(max_tokens=3, ignore_eos=True))
    verifier = Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"),
                        SpeculationBudget(None, 8, num_fixed=3))
    drafter = BatchDrafter(ModelRunner(draft_model, "cpu", decoder_impl="lean"), max_catch_up=CHUNK, max_verify_rows=100)
    batch, outputs, passes = BatchDecoder(verifier, 2, CHUNK, True, KVBudget(100_000, 1, "test"), 17, drafter), [], []
    forward_batch = batch.decoder.forward_batch
    batch.decoder.forward_batch = lambda rows: passes.append([len(ids) for _, ids in rows]) or forward_batch(rows)
    batch.admit(new_sequence(stream, [], MAX_MODEL_LEN, "coupled"))
    batch.step(outputs.append)                                           # the stream's prompt
    batch.admit(new_sequence(long, [], MAX_MODEL_LEN, "coupled"))
    del passes[:]
    while batch.running[99].slot.num_cached < 3 * CHUNK - 1:
        batch.step(outputs.append)
    assert all(rows[0] == 4 for rows in passes), "the stream drafts k = 3 beside the prefill"
    assert all(sum(rows) == 17 for rows in passes[:-1]) and sum(passes[-1]) <= 17, passes


def test_a_new_request_reuses_the_kv_of_a_finished_one_it_shares_a_prefix_with(model):
    shared = [(7 * i) % 200 for i in range(80)]
    first = StartRequest(1, shared + [3, 4], SamplingParams(max_tokens=10, ignore_eos=True))
    follow_up = StartRequest(2, shared + [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    other = StartRequest(3, [9, 9, 9], SamplingParams(max_tokens=10, ignore_eos=True))
    batch, outputs = _batch(model, 2), []
    for req in (other, first):
        batch.admit(new_sequence(req, [], MAX_MODEL_LEN, "coupled"))
    while batch.is_busy:
        batch.step(outputs.append)
    seq = new_sequence(follow_up, [], MAX_MODEL_LEN, "coupled")
    batch.admit(seq)
    assert seq.stats.num_cached_prompt_tokens == len(shared)            # the slot of `first`, not `other`'s
    while batch.is_busy:
        batch.step(outputs.append)
    alone = new_sequence(follow_up, [], MAX_MODEL_LEN, "coupled")
    run_decode(alone, _verifier(model), NoProposer(), lambda out: None, lambda: False)
    assert seq.token_ids == alone.token_ids


def test_kv_stays_within_each_reservation_and_the_budget(model):
    """Slots never grow past their request's reservation; finished slots kept for prefix reuse are
    dropped, oldest first, when a new reservation needs room; outputs are unchanged."""
    vocab, rng = model.config.vocab_size, random.Random(9)
    a, b, c = [StartRequest(i + 1, [rng.randrange(vocab) for _ in range(n)], SamplingParams(max_tokens=m, ignore_eos=True))
               for i, (n, m) in enumerate([(300, 20), (10, 290), (100, 300)])]     # reservations 320, 300, 400
    batch, outputs = _batch(model, 2, kv_budget_tokens=650), []

    def run_to_completion():
        while batch.is_busy:
            batch.step(outputs.append)
            assert all(run.slot.capacity <= run.seq.max_len for run in batch.running.values())
            assert batch.num_kv_tokens_held <= 650

    for req in (a, b):
        batch.admit(new_sequence(req, [], MAX_MODEL_LEN, "coupled"))
    run_to_completion()
    assert [free.slot.capacity for free in batch._free_slots] == [320, 300]     # kept for reuse, a's oldest
    batch.admit(new_sequence(c, [], MAX_MODEL_LEN, "coupled"))               # takes a's slot; 400 + 300 > 650
    assert batch._free_slots == [] and batch.num_kv_tokens_held == 400
    run_to_completion()
    got = _collect(outputs)
    for req in (a, b, c):
        alone = new_sequence(req, [], MAX_MODEL_LEN, "coupled")
        run_decode(alone, _verifier(model), NoProposer(), lambda out: None, lambda: False)
        assert got[req.request_id]["tokens"] == alone.output_ids
    tight = _batch(model, 2, kv_budget_tokens=600)
    tight.admit(new_sequence(a, [], MAX_MODEL_LEN, "coupled"))
    with pytest.raises(RuntimeError, match="budget"):                          # 320 + 300 > 600
        tight.admit(new_sequence(b, [], MAX_MODEL_LEN, "coupled"))


def test_batching_needs_the_lean_decoder(model):
    runner = ModelRunner(model, "cpu", decoder_impl="hf")
    with pytest.raises(ValueError, match="lean decoder"):
        batch_decoder_for(Verifier(runner, SpeculationBudget(None, 8)), EngineConfig(verify_model="v", max_num_seqs=4))
    assert torch.is_tensor(runner.forward([1]))


# ---- through the supervisor and a live verify worker ------------------------------------------

def _submit_all(sup, prompts, **params):
    import itertools
    outputs = {i: [] for i in range(len(prompts))}
    for i, prompt in zip(itertools.count(), prompts):
        sup.submit(GenerationRequest(500 + i, list(prompt), SamplingParams(**params)), outputs[i].append)
    return outputs


def test_the_engine_batches_ar_requests_and_each_gets_its_own_output(session_cache_dir):
    from tests.engine_helpers import random_prompts, run, start_engine, tiny_config, wait_until
    prompts = random_prompts(7, seed=2)
    params = dict(max_tokens=24, temperature=0.8, top_k=30, seed=5, ignore_eos=True)
    alone = start_engine(tiny_config(session_cache_dir, "ar"))
    try:
        expected = [run(alone, p, **params)[0] for p in prompts]
    finally:
        alone.shutdown()
    sup = start_engine(tiny_config(session_cache_dir, "ar", max_num_seqs=4, max_model_len=4096))
    try:
        assert sup.max_num_running == 4
        long = []                                   # cancelled while six others run and wait beside it
        sup.submit(GenerationRequest(499, list(prompts[0]), SamplingParams(max_tokens=3000, ignore_eos=True)),
                   long.append)
        outputs = _submit_all(sup, prompts, **params)
        assert wait_until(lambda: len(long) > 3, 30)
        sup.cancel(499)
        assert wait_until(lambda: all(o and o[-1].finished for o in [long, *outputs.values()]), 60)
        assert long[-1].finish_reason == "cancelled"
        assert [[t for o in outs for t in o.token_ids] for outs in outputs.values()] == expected
        assert _largest_batch([outs[-1].stats for outs in outputs.values()]) == 4
        # kill -9 mid-batch: every running request ends with an error, the engine comes back
        kill_mid_batch(sup, "verify", _submit_all(sup, prompts[:5], max_tokens=3000, ignore_eos=True), 4)
        assert wait_until(sup.is_healthy, 60)
        assert run(sup, prompts[1], **params)[0] == expected[1]
    finally:
        sup.shutdown()


def kill_mid_batch(sup, victim: str, outputs: dict, num_running: int) -> None:
    """kill -9 the victim worker while num_running of `outputs`' requests (ids 500 + key) run: they
    end with an error. One that was waiting may run to its length after the restart: it is cancelled,
    so the test does not wait for thousands of tokens on a slow machine."""
    from tests.engine_helpers import wait_until

    def num_finished():
        return sum(bool(o) and o[-1].finished for o in outputs.values())
    assert wait_until(lambda: sum(bool(o) for o in outputs.values()) >= num_running, 30)
    os.kill(sup.worker_pids()[victim], signal.SIGKILL)
    assert wait_until(lambda: num_finished() >= num_running, 60)
    for key, outs in outputs.items():
        if not (outs and outs[-1].finished):
            sup.cancel(500 + key)
    assert wait_until(lambda: num_finished() == len(outputs), 60)
    reasons = [o[-1].finish_reason for o in outputs.values()]
    assert reasons.count("error") >= num_running and set(reasons) <= {"error", "length", "cancelled"}, reasons


def _largest_batch(stats) -> int:
    """The most sequences any verify pass held, from the requests' num_passes_by_batch_size."""
    return max(size for st in stats for size, count in enumerate(st.num_passes_by_batch_size, start=1) if count)


def test_the_kv_budget_limits_how_many_requests_run_at_once(session_cache_dir):
    """max_num_seqs 4, but a KV budget of 2.5 reservations: two run at once, the rest wait their
    turn (all finish, each with its own tokens); a request larger than the budget is refused."""
    from transformers import AutoConfig

    from engine.kv_budget import GiB, kv_bytes_per_token
    from tests.engine_helpers import random_prompts, run, start_engine, tiny_config, wait_until
    cfg = AutoConfig.from_pretrained(ensure_tiny_model("tiny-random/verify", session_cache_dir))
    per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                   cfg.hidden_size // cfg.num_attention_heads, 8)          # float64
    prompts = [p[:20] + [1] * (20 - len(p[:20])) for p in random_prompts(6, seed=3)]
    reservation = 20 + 40
    sup = start_engine(tiny_config(session_cache_dir, "ar", max_num_seqs=4,
                                   kv_cache_memory_gb=2.5 * reservation * per_token / GiB))
    try:
        assert sup.health()["workers"]["verify"]["kv_bytes_per_token"] == per_token
        assert sup.health()["kv_cache"] == {"budget_tokens": int(2.5 * reservation), "reserved_tokens": 0}
        expected = [run(sup, p, max_tokens=40, ignore_eos=True)[0] for p in prompts]
        outputs = _submit_all(sup, prompts, max_tokens=40, ignore_eos=True)
        assert wait_until(lambda: all(o and o[-1].finished for o in outputs.values()), 60)
        assert [[t for o in outs for t in o.token_ids] for outs in outputs.values()] == expected
        assert _largest_batch([outs[-1].stats for outs in outputs.values()]) == 2
        assert sup.health()["kv_cache"]["reserved_tokens"] == 0
        with pytest.raises(ValueError, match="KV cache budget"):
            sup.submit(GenerationRequest(900, [1] * 100, SamplingParams(max_tokens=100)), print)
        one = run(sup, prompts[0], max_tokens=5, ignore_eos=True)[1].stats
        assert one.num_passes_by_batch_size[0] >= 1
    finally:
        sup.shutdown()


def test_the_engine_batches_sync_requests_and_each_gets_what_ar_gives(session_cache_dir):
    from tests.engine_helpers import random_prompts, run, start_engine, tiny_config, wait_until
    prompts = random_prompts(5, seed=7)
    params = dict(max_tokens=20, temperature=0.7, seed=9, ignore_eos=True)
    sup = start_engine(tiny_config(session_cache_dir, "sync", max_num_seqs=3, num_speculative_tokens=2))
    try:
        assert sup.max_num_running == 3 and sup.health()["workers"]["verify"]["max_num_seqs"] == 3
        expected = [run(sup, p, **params)[0] for p in prompts]           # one at a time through the batch
        outputs = _submit_all(sup, prompts, **params)
        assert wait_until(lambda: all(o and o[-1].finished for o in outputs.values()), 60)
        assert [[t for o in outs for t in o.token_ids] for outs in outputs.values()] == expected
        stats = [outs[-1].stats for outs in outputs.values()]
        assert _largest_batch(stats) == 3 and sum(st.num_accepted_tokens for st in stats) > 0
    finally:
        sup.shutdown()
    ar = start_engine(tiny_config(session_cache_dir, "ar"))
    try:
        assert [run(ar, p, **params)[0] for p in prompts] == expected
    finally:
        ar.shutdown()


def test_a_steps_rejected_guesses_do_not_lower_the_drafts_acceptance(model):
    """The budget learns the draft model's rate: n-gram guesses after the draft's tokens are the
    lookup's (a step with guesses only, all rejected, used to count as a draft rejection)."""
    verifier = _verifier(model)
    seq = new_sequence(_requests(model.config.vocab_size)[0], [], 512, "coupled")
    verifier.start(seq)
    verifier.prefill(seq)
    with torch.inference_mode():
        greedy = int(verifier.runner.forward([seq.token_ids[-1]])[0].argmax())
        verifier.runner.crop(len(seq.token_ids) - 1)
        wrong = (greedy + 1) % model.config.vocab_size
        before = seq.budget.acceptance.rate
        verifier.step(seq, [], [wrong, wrong])                    # guesses only, rejected
        assert seq.budget.acceptance.rate == before and seq.stats.num_lookup_tokens == 2
        verifier.step(seq, [wrong], [])                           # a draft token, rejected
        assert seq.budget.acceptance.rate < before
