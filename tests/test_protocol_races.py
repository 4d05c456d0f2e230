"""The async protocol under forced interleavings (issue 11, items 2 and 3), in one process, no workers.

The draft loop runs in a thread against a real SharedState and a tiny draft model; the test plays
the verify worker by writing the shared fields itself, at the exact moment it wants: right after
the draft has read something. That reproduces orderings that two processes hit only by chance.
"""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from engine.async_decode import Drafter  # noqa: E402
from engine.messages import SamplingParams, StartRequest  # noqa: E402
from engine.models import ModelRunner, load_causal_lm, resolve_model_spec  # noqa: E402
from engine.shared_state import Ctrl, SharedState  # noqa: E402
from engine.token_channel import HostDraftChannel  # noqa: E402

REQUEST_A, REQUEST_B = 5, 6
MAX_LEN = 256


class SwitchAfterRequestCheck(SharedState):
    """SharedState whose Nth read of REQUEST_ID (while it says A) is followed at once by the verify
    finishing A and starting B: the read returns A, but every later read sees B's state."""

    def __init__(self, shm, max_len, is_owner, switch_on_read: int, prompt_b: list[int]):
        super().__init__(shm, max_len, is_owner)
        self.num_reads = 0
        self.switch_on_read = switch_on_read
        self.prompt_b = prompt_b
        self.epoch_b: int | None = None
        self.epochs_adopted_in_a: list[int] = []

    def get(self, field):
        value = super().get(field)
        if field == Ctrl.REQUEST_ID and value == REQUEST_A:
            self.num_reads += 1
            if self.num_reads == self.switch_on_read:
                self._verify_switches_to_b()
        return value

    def set(self, field, value):
        if field == Ctrl.DRAFT_EPOCH:
            self.epochs_adopted_in_a.append(int(value))
        super().set(field, value)

    def _verify_switches_to_b(self):
        # The verify's own write order (engine/async_decode.py, SharedDraftProposer.finish): finish A ...
        super().set(Ctrl.REQUEST_ID, 0)
        super().set(Ctrl.LAST_FINISHED_REQUEST_ID, REQUEST_A)
        # ... then start B: prompt, NUM_COMMITTED, EPOCH + 1, REQUEST_ID.
        self.committed_tokens[:len(self.prompt_b)] = self.prompt_b
        super().set(Ctrl.NUM_COMMITTED, len(self.prompt_b))
        self.epoch_b = super().get(Ctrl.EPOCH) + 1
        super().set(Ctrl.EPOCH, self.epoch_b)
        super().set(Ctrl.REQUEST_ID, REQUEST_B)


@pytest.fixture(scope="module")
def draft_runner(tmp_path_factory):
    path, _ = resolve_model_spec("tiny-random/draft", str(tmp_path_factory.mktemp("cache")))
    return ModelRunner(load_causal_lm(path, None, "cpu", "float64"), "cpu")


def _owned_state(switch_on_read: int, prompt_b: list[int]) -> SwitchAfterRequestCheck:
    plain = SharedState.create(MAX_LEN)
    plain.ctrl = plain.clock = plain.committed_tokens = plain.draft_tokens = None   # hand the segment over
    return SwitchAfterRequestCheck(plain.shm, MAX_LEN, True, switch_on_read, prompt_b)


@pytest.mark.parametrize("switch_on_read", [1, 2, 3, 5])
def test_draft_of_a_never_adopts_the_epoch_of_b(draft_runner, switch_on_read):
    prompt_a, prompt_b = [10, 20, 30, 40], [7, 8, 9, 11, 12, 13]
    state = _owned_state(switch_on_read, prompt_b)
    try:
        # The verify has published request A (what SharedDraftProposer.start does before the prefill).
        state.committed_tokens[:len(prompt_a)] = prompt_a
        SharedState.set(state, Ctrl.NUM_COMMITTED, len(prompt_a))
        SharedState.set(state, Ctrl.EPOCH, 3)
        SharedState.set(state, Ctrl.REQUEST_ID, REQUEST_A)
        drafter = Drafter(draft_runner, state, HostDraftChannel(state), max_draft_lead=4, max_model_len=MAX_LEN,
                          wait_timeout_s=5)
        request = StartRequest(REQUEST_A, prompt_a, SamplingParams(max_tokens=32))
        thread = threading.Thread(target=drafter.run, args=(request,), daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the draft loop of A did not notice that A finished"
        assert state.epoch_b is not None, "the interleaving was never forced"
        assert state.epoch_b not in state.epochs_adopted_in_a, (
            f"the draft loop of request A set DRAFT_EPOCH to B's epoch {state.epoch_b} "
            f"(adopted: {state.epochs_adopted_in_a}): B's verify would trust A's draft tokens")
    finally:
        state.close()


# ---- issue 11, item 3: n-gram guesses the verify accepts past the draft's tokens ---------------

class ConcurrentDraftVerifier:
    """Stands in for the Verifier: while its 'forward' runs, the draft publishes more tokens (one
    that disagrees with the verify's first n-gram guess); then it accepts every proposal."""

    def __init__(self, state: SharedState, num_to_check: int):
        from engine.cost_model import SpeculationBudget
        self.state = state
        self.budget = SpeculationBudget.__new__(SpeculationBudget)
        self.budget.num_to_check = lambda: num_to_check
        self.num_guesses_seen = 0

    def start(self, seq):
        seq.budget = self.budget

    def prefill(self, seq):
        # The draft has reconciled with the new request and drafted one token.
        SharedState.set(self.state, Ctrl.DRAFT_EPOCH, self.state.get(Ctrl.EPOCH))
        self.state.draft_tokens[:seq.num_committed] = seq.token_ids
        self.state.draft_tokens[seq.num_committed] = 3
        SharedState.set(self.state, Ctrl.NUM_DRAFTED, seq.num_committed + 1)

    def step(self, seq, draft_ids, guess_ids, q_rows):
        from engine.messages import TokensOut
        c = seq.num_committed
        self.num_guesses_seen = len(guess_ids)
        # Meanwhile the draft went on: position c+1 differs from the first guess, the rest is as guessed.
        continuation = [guess_ids[0] + 100] + list(guess_ids[1:]) + [42]
        start = c + len(draft_ids)
        self.state.draft_tokens[start:start + len(continuation)] = continuation
        SharedState.set(self.state, Ctrl.NUM_DRAFTED, start + len(continuation))
        new_ids = list(draft_ids) + list(guess_ids) + [42]            # all accepted, bonus = draft's token
        seq.token_ids.extend(new_ids)
        return TokensOut(seq.request_id, new_ids, None)


def test_accepted_guesses_the_draft_disagrees_with_invalidate_its_tokens():
    from engine.async_decode import SharedDraftProposer
    from engine.decoding import new_sequence, run_decode
    from engine.proposers import NgramGuesses
    from engine.shared_state import VerifySide
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]                     # the n-gram lookup guesses 1, 2 after "... 2, 3"
    state = SharedState.create(MAX_LEN)
    try:
        seq = new_sequence(StartRequest(REQUEST_A, prompt, SamplingParams(max_tokens=32)), [], MAX_LEN, "coupled")
        verifier = ConcurrentDraftVerifier(state, num_to_check=4)
        num_checks = iter([False, True])
        proposer = NgramGuesses(SharedDraftProposer(VerifySide(state), HostDraftChannel(state)), max_ngram=3)
        run_decode(seq, verifier, proposer, lambda out: None, lambda: next(num_checks))
        assert verifier.num_guesses_seen > 0, "the step must have checked n-gram guesses"
        committed = state.committed_tokens[:state.get(Ctrl.NUM_COMMITTED)].tolist()
        drafted = state.draft_tokens[:state.get(Ctrl.NUM_DRAFTED)].tolist()
        is_draft_trusted = state.get(Ctrl.DRAFT_EPOCH) == state.get(Ctrl.EPOCH)
        overlap = min(len(committed), len(drafted))
        # Invariant I: while DRAFT_EPOCH == EPOCH the draft's tokens agree with the commit.
        assert not is_draft_trusted or drafted[:overlap] == committed[:overlap], (
            f"EPOCH kept although the draft holds {drafted[len(prompt):overlap]} "
            f"where {committed[len(prompt):overlap]} was committed")
    finally:
        state.close()


# ---- a long prompt's wide prefill: the request is published after it -------------------------------

@pytest.mark.parametrize("is_wide", [False, True])
def test_the_verify_publishes_a_request_after_a_prefill_on_the_drafts_core(is_wide):
    """SharedDraftProposer: before the verify's prefill as a rule; after it (at the first step) when
    that prefill runs on the draft's core too, so the draft does not prefill on the same core."""
    from engine.async_decode import SharedDraftProposer
    from engine.decoding import new_sequence
    from engine.shared_state import VerifySide
    state = SharedState.create(MAX_LEN)
    try:
        side = VerifySide(state)
        proposer = SharedDraftProposer(side, HostDraftChannel(state), prefills_wide=lambda seq: is_wide)
        seq = new_sequence(StartRequest(REQUEST_A, [1, 2, 3], SamplingParams(max_tokens=4)), [], MAX_LEN, "coupled")
        seq.budget = ConcurrentDraftVerifier(state, num_to_check=2).budget
        proposer.start(seq)
        assert state.get(Ctrl.REQUEST_ID) == (0 if is_wide else REQUEST_A)
        proposer.propose(seq)                                  # the first step, after the prefill
        assert state.get(Ctrl.REQUEST_ID) == REQUEST_A
        assert state.committed_tokens[:state.get(Ctrl.NUM_COMMITTED)].tolist() == [1, 2, 3]
        # cancelled during the prefill, never published: the waiting draft is still let go
        seq_b = new_sequence(StartRequest(REQUEST_B, [4, 5], SamplingParams(max_tokens=4)), [], MAX_LEN, "coupled")
        proposer.start(seq_b)
        if is_wide:
            seq_b.stats.num_draft_forwards = -1                # stays: no stats of another request's draft
            proposer.finish(seq_b)
            assert seq_b.stats.num_draft_forwards == -1
            from engine.shared_state import DraftSide
            assert DraftSide(state).is_started(REQUEST_B) is False
    finally:
        state.close()
