"""engine/proposers.py LocalDraftProposer (`sync` one request at a time): equal to `ar`, k draft
forwards per step and no more, and a draft cache that only ever holds committed tokens between steps.

Float64 tiny models. With the verify model as its own draft every draft token is accepted, which is
the case where the cache lacks the last draft token after a step: it must ride along with the next
step's first forward instead of costing a forward of its own.
"""
from __future__ import annotations

import random

import pytest

from engine.cost_model import SpeculationBudget
from engine.decoding import Verifier, new_sequence, run_decode
from engine.messages import SamplingParams, StartRequest
from engine.models import ModelRunner
from engine.proposers import LocalDraftProposer, NoProposer

MAX_MODEL_LEN = 1024


class CountingRunner(ModelRunner):
    """A ModelRunner that counts its forward calls (prefill is not one)."""

    def __init__(self, model):
        super().__init__(model, "cpu", decoder_impl="lean")
        self.num_forwards = 0

    def forward(self, token_ids, last_only: bool = False):
        self.num_forwards += 1
        return super().forward(token_ids, last_only)


def _run(model, proposer, request: StartRequest, num_fixed: int = 0, after_step=lambda seq: None):
    """run_decode with a fixed k (0: the cost model's); after_step(seq) runs after every step."""
    seq = new_sequence(request, [], MAX_MODEL_LEN, "coupled")
    tokens = []

    def emit(out):
        tokens.extend(out.token_ids)
        after_step(seq)

    verifier = Verifier(ModelRunner(model, "cpu", decoder_impl="lean"), SpeculationBudget(None, 8, num_fixed=num_fixed))
    run_decode(seq, verifier, proposer, emit, lambda: False)
    return seq, tokens


def _request(vocab: int, seed: int, params: SamplingParams) -> StartRequest:
    rng = random.Random(seed)
    return StartRequest(1, [rng.randrange(vocab) for _ in range(9)], params)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40, ignore_eos=True),
                                    SamplingParams(max_tokens=40, temperature=0.8, seed=5, ignore_eos=True)])
def test_sync_with_an_exact_draft_drafts_k_tokens_in_k_forwards(model, params):
    request = _request(model.config.vocab_size, 1, params)
    _, ar_tokens = _run(model, NoProposer(), request)
    drafter = CountingRunner(model)
    seq, tokens = _run(model, LocalDraftProposer(drafter), request, num_fixed=3)
    assert tokens == ar_tokens
    assert seq.stats.num_accepted_tokens == seq.stats.num_draft_tokens > 0            # the draft is the verify
    # every step drafts its k tokens in exactly k forwards (the old catch-up forward made it k + 1)
    assert drafter.num_forwards == seq.stats.num_draft_forwards == seq.stats.num_draft_tokens


@pytest.mark.parametrize("seed", [2, 3])
def test_sync_rolls_the_draft_back_to_committed_tokens_only(model, draft_model, seed):
    params = SamplingParams(max_tokens=60, temperature=0.9, seed=seed, ignore_eos=True)
    request = _request(model.config.vocab_size, seed, params)
    _, ar_tokens = _run(model, NoProposer(), request)
    drafter = ModelRunner(draft_model, "cpu", decoder_impl="lean")

    def check_draft_cache(seq):
        # after every step the draft cache holds a prefix of the committed tokens, short of the pending one
        assert drafter.num_cached <= seq.num_committed - 1
        assert drafter.cached_ids == seq.token_ids[:drafter.num_cached]

    seq, tokens = _run(model, LocalDraftProposer(drafter), request, num_fixed=3, after_step=check_draft_cache)
    assert tokens == ar_tokens
    assert seq.stats.num_rollbacks > 0 and seq.stats.num_accepted_tokens > 0


def test_a_long_lag_is_caught_up_in_chunks(model):
    """Many steps without drafting leave the draft far behind: it prefills the lag, then drafts."""
    request = _request(model.config.vocab_size, 4, SamplingParams(max_tokens=200, ignore_eos=True))
    drafter = CountingRunner(model)
    proposer = LocalDraftProposer(drafter)
    seq = new_sequence(request, [], MAX_MODEL_LEN, "coupled")
    Verifier(ModelRunner(model, "cpu", decoder_impl="lean"), SpeculationBudget(None, 8, num_fixed=2)).start(seq)
    proposer.start(seq)
    seq.token_ids.extend(range(1, 2 + LocalDraftProposer.MAX_LAG_IN_ONE_FORWARD))      # committed meanwhile
    proposal = proposer.propose(seq)
    assert len(proposal.draft_ids) == 2 and drafter.num_forwards == 2
    assert drafter.cached_ids == seq.token_ids + proposal.draft_ids[:1]
