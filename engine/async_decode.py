"""AMUSD: the draft and verify workers decoding one sequence at the same time.

Shared fields (engine/shared_state.py), each with exactly ONE writer:

    field                      writer      meaning
    committed_tokens[i]        verify      final token i (prompt, then output); never rewritten in a request
    NUM_COMMITTED              verify      committed_tokens[:NUM_COMMITTED] are final
    EPOCH                      verify      bumped when the draft's buffer may disagree with the commit
    REQUEST_ID                 verify      request being decoded (0 = none)
    LAST_FINISHED_REQUEST_ID   verify      the draft stops working on a request once it sees it here
    draft_tokens[i]            draft       draft token i (i < NUM_DRAFTED)
    NUM_DRAFTED                draft       draft_tokens[:NUM_DRAFTED] valid (under DRAFT_EPOCH)
    DRAFT_EPOCH                draft       the EPOCH draft_tokens were last reconciled with
    CANCEL_REQUEST_ID          supervisor  stop this request (verify checks it before every step)
    (REQUEST_ID, LAST_FINISHED_REQUEST_ID: the supervisor writes them once, `release_draft`, only after
     the verify process died, so there is still one writer at a time.)
The writes live in engine/shared_state.py: VerifySide and DraftSide, one method per ordered group.

Order of writes (x86-64 keeps stores in program order, loads likewise):
    verify commit:    committed_tokens[c:c'] -> NUM_COMMITTED = c' -> (if needed) EPOCH += 1
    draft append:     draft_tokens[n] -> NUM_DRAFTED = n + 1   (q row first, when rejection sampling)
    draft loop turn:  read EPOCH, then check REQUEST_ID (the other order can adopt the next request's epoch)
    draft reconcile:  draft_tokens[p:c] = committed[p:c] -> NUM_DRAFTED -> DRAFT_EPOCH = EPOCH read

Invariant I: while DRAFT_EPOCH == EPOCH,
    draft_tokens[:min(NUM_DRAFTED, NUM_COMMITTED)] == committed_tokens[:min(NUM_DRAFTED, NUM_COMMITTED)].
It holds because (a) the draft sets DRAFT_EPOCH = e only after making its buffer agree with the
commit it read under e; (b) under an unchanged EPOCH the draft only appends; (c) the verify commits
a token at position i without bumping EPOCH only if it checked draft_tokens[i] (i < NUM_DRAFTED,
DRAFT_EPOCH == EPOCH) equals it; in every other case (rejection, a bonus token the draft has not
reached, a draft that is still reconciling) it bumps EPOCH. The verify is the only EPOCH writer, so
once it reads DRAFT_EPOCH == EPOCH nothing can invalidate the draft tokens it then reads.
Consequences: the verify uses draft tokens d[c:n] only when DRAFT_EPOCH == EPOCH, so it never mixes
a stale draft with a new prefix; it never waits for the draft (no fresh tokens -> a plain one-token
step); the draft acknowledges a rollback only after rewriting its tokens (not before, as in the
reference code); nobody waits for an acknowledgement, so there is nothing to hang on.

Rollback on the draft (reconcile): find the first position p where its tokens differ from the
commit, crop its KV cache to p and feed committed[p:c-1] (usually nothing: p = c-1), so the
pending token is committed[c-1] and no token is fed twice (the reference re-feeds one).
The draft never runs more than `max_draft_lead` tokens past NUM_COMMITTED.
The verify publishes a request (start_request) before its prefill, or after it when that prefill
runs on the draft's core too (a long prompt, `prefill_cores`): the draft then prefills on its own
core while the verify decodes the first tokens alone (HumanEval TTFT 1.2 -> 0.7 s on 2 cores).
With `max_num_seqs` > 1 (CPU) every sequence has a row of these fields: engine/async_batch.py.
"""
from __future__ import annotations

import time

from engine.decoding import Sequence, sync_cache
from engine.logits_processors import MakeGrammar, build_logits_processors, stop_token_ids
from engine.messages import StartRequest, TokensOut
from engine.models import ModelRunner
from engine.ngram import LookupBudget, propose_from_ngrams
from engine.proposers import NoProposer, Proposal
from engine.shared_state import Clock, DraftSide, SharedState, VerifySide
from engine.token_channel import HostDraftChannel
from engine.token_chooser import DRAFT_STREAM, TokenChooser

IDLE_SLEEP_S = 0.0002


def first_disagreement(draft_tokens, committed_tokens, num_prompt_tokens: int, num_drafted: int,
                       num_committed: int) -> int:
    """Reconciliation: the first position where the draft's tokens differ from the commit (both
    numpy rows), or min(num_drafted, num_committed) if they agree that far."""
    overlap = min(num_drafted, num_committed)
    start = num_prompt_tokens                  # the prompt is committed and copied as it is
    mismatch = (draft_tokens[start:overlap] != committed_tokens[start:overlap]).nonzero()[0]
    return start + int(mismatch[0]) if len(mismatch) else overlap


class SharedDraftProposer(NoProposer):
    """The verify half of the protocol: propose what the draft worker has drafted, commit, invalidate.

    Rejection sampling: the draft's q rows come from the channel's [R, V] ring (row = position % R).
    The draft writes row p before publishing token p and never runs R positions past NUM_COMMITTED,
    so a row the verify reads cannot be overwritten during the read.
    """

    def __init__(self, side: VerifySide, channel: HostDraftChannel, prefills_wide=None):
        self.side, self.channel = side, channel
        self.prefills_wide = prefills_wide     # Sequence -> bool: the verify's prefill takes the draft's core too
        self.position = 0                  # NUM_COMMITTED when the step's proposal was read
        self.is_published = False

    def start(self, seq: Sequence) -> None:
        """Publish the request (the draft may start now), unless the verify's prefill runs on the
        draft's core too: then after it (first `propose`), so the two prefills do not share a core."""
        self.is_published = False
        if not (self.prefills_wide and self.prefills_wide(seq)):
            self._publish(seq)

    def _publish(self, seq: Sequence) -> None:
        self.side.start_request(seq.request_id, seq.token_ids)
        self.is_published = True

    def propose(self, seq: Sequence) -> Proposal:
        if not self.is_published:
            self._publish(seq)             # before the first step: the prompt is all that is committed
        c = self.position = seq.num_committed
        num_to_check = seq.budget.num_to_check()                             # cost model: worth checking now
        num_drafted = self.side.num_consistent_drafted()
        seq.stats.sum_draft_lead += max(0, num_drafted - c)
        draft_ids = self.channel.read_for_verify(c, min(num_drafted, c + num_to_check)) if num_drafted > c else []
        q_rows = self.channel.q_rows_for_verify(c, c + len(draft_ids)) if seq.chooser.is_rejection and draft_ids \
            else None
        return Proposal(num_to_check, draft_ids, draft_probs=q_rows)

    def observe(self, seq: Sequence, proposal: Proposal, out: TokensOut) -> None:
        side, channel, c = self.side, self.channel, self.position
        num_draft, new_ids = len(proposal.draft_ids), out.token_ids
        side.commit(c, new_ids)
        # Does the draft hold every committed token it was not checked against: the n-gram guesses
        # accepted past its tokens (c + num_draft .. last_pos - 1) and the correction/bonus?
        last_pos = c + len(new_ids) - 1
        is_rejected = len(new_ids) - 1 < num_draft
        is_confirmed = (not is_rejected and side.num_consistent_drafted() > last_pos
                        and channel.read_for_verify(c + num_draft, last_pos + 1) == new_ids[num_draft:])
        if not is_confirmed:
            side.invalidate_draft()
            # A real rollback: the draft had already produced a different token there.
            seq.stats.num_rollbacks += is_rejected or side.num_drafted() > last_pos

    def finish(self, seq: Sequence) -> None:
        self.side.finish_request(seq.request_id)       # also frees a draft still waiting for the start
        if self.is_published:                          # else the draft's stats are another request's
            _collect_draft_stats(seq, self.side)


def _collect_draft_stats(seq: Sequence, side: VerifySide) -> None:
    draft = side.draft_stats()
    stats = seq.stats
    stats.num_draft_tokens_produced = draft["num_drafted_total"]
    # discarded on reconciliation + drafted past the final commit (approximate: the draft may be mid-step)
    stats.num_draft_tokens_wasted = draft["num_discarded"] + max(0, side.num_consistent_drafted() - seq.num_committed)
    stats.draft_busy_s = draft["busy_us"] / 1e6
    stats.num_draft_forwards = draft["num_forwards"]


class Drafter:
    """Draft-worker side: drafts continuously for the running request, reconciling on EPOCH changes."""

    def __init__(self, runner: ModelRunner, state: SharedState, channel: HostDraftChannel,
                 max_draft_lead: int, max_model_len: int, wait_timeout_s: float, lookup_ngram: int = 0,
                 scheme: str = "coupled", eos_token_ids: list[int] = (),
                 make_grammar: MakeGrammar | None = None):
        self.runner = runner
        self.eos_token_ids = list(eos_token_ids)    # the draft model's own: min_tokens masks them like the verify's
        self.make_grammar = make_grammar
        self.scheme = scheme
        self.lookup_ngram = lookup_ngram
        self.state = state
        self.side = DraftSide(state)
        self.channel = channel
        self.max_draft_lead = max_draft_lead
        self.max_model_len = max_model_len
        self.wait_timeout_s = wait_timeout_s
        self.num_discarded = 0

    def run(self, req: StartRequest) -> None:
        state, side = self.state, self.side
        rid = req.request_id
        self.channel.reset()                   # nothing of the previous request still in flight
        if not self._wait_for_start(rid):
            return
        prompt = req.prompt_token_ids
        n_prompt = len(prompt)
        processors = build_logits_processors(req.params, prompt, stop_token_ids(req.params, self.eos_token_ids),
                                             self.make_grammar)
        chooser = TokenChooser(req.params, self.scheme, DRAFT_STREAM, processors)
        budget = LookupBudget()
        max_len = min(n_prompt + req.params.max_tokens, self.max_model_len)
        busy_s = 0.0
        num_drafted_total = num_forwards = self.num_discarded = 0
        side.record_stats(0, 0, 0.0, 0)
        start = time.perf_counter()
        self.runner.score_prompt("running", prompt)      # one request at a time: replaces the last one's
        self.runner.prefill(prompt)
        busy_s += time.perf_counter() - start
        self.channel.overwrite(0, prompt)
        length = n_prompt                      # draft_tokens[:length] is the draft's sequence
        pending = None                         # device tensor of the last token when not yet on host
        draft_epoch = -1
        while True:
            state.beat(Clock.DRAFT_HEARTBEAT)
            self.channel.flush()
            epoch = side.epoch_while_running(rid)
            if epoch is None:
                break
            if epoch != draft_epoch:
                start = time.perf_counter()
                length = self._reconcile(length, n_prompt)
                pending = None
                side.adopt(epoch, length)
                draft_epoch = epoch
                busy_s += time.perf_counter() - start
                side.record_stats(num_drafted_total, self.num_discarded, busy_s, num_forwards)
            num_committed = side.num_committed()
            if length - num_committed >= self.max_draft_lead or length >= max_len:
                time.sleep(IDLE_SLEEP_S)
                continue
            start = time.perf_counter()
            room = min(self.max_draft_lead - (length - num_committed), max_len - length)
            new_ids, pending = self._draft_step(chooser, budget, length, n_prompt, room, pending)
            length += len(new_ids)
            num_drafted_total += len(new_ids)
            num_forwards += 1
            busy_s += time.perf_counter() - start
            side.record_stats(num_drafted_total, self.num_discarded, busy_s, num_forwards)

    def _draft_step(self, chooser: TokenChooser, budget: LookupBudget, length: int, n_prompt: int, room: int,
                    pending):
        """One draft forward: the pending token plus n-gram guesses the draft model then checks.

        Same accept rule as the verify step, applied by the draft to its own guesses, so its output
        is what one-token-at-a-time drafting would give. Returns (new token ids, pending tensor).
        Logits processors see the draft's own output so far, draft_tokens[n_prompt:length] (a CUDA
        draft then waits for its last token to reach the host: only requests that have processors).
        """
        tokens = self.state.draft_tokens
        if chooser.processors:
            self.channel.sync_host()
        guesses = []
        if self.lookup_ngram and pending is None and not chooser.is_rejection:
            guesses = propose_from_ngrams(tokens[:length], self.lookup_ngram, budget.num_guesses(room - 1))
        last = pending.view(1) if pending is not None else [int(tokens[length - 1])]
        logits = self.runner.forward(last if not guesses else last + guesses, last_only=not guesses)
        chosen, q = chooser.draft(logits, tokens[n_prompt:length], guesses)    # [1 + len(guesses)]
        num_accepted = 0
        if guesses:
            chosen_ids = chosen.tolist()
            while num_accepted < len(guesses) and guesses[num_accepted] == chosen_ids[num_accepted]:
                num_accepted += 1
            self.runner.crop(length + num_accepted)
            budget.record(len(guesses), num_accepted)
        new_ids = [self.channel.publish(length + i, chosen[i], None if q is None else q[i])
                   for i in range(num_accepted + 1)]
        return new_ids, (chosen[num_accepted] if new_ids[-1] < 0 else None)

    def _wait_for_start(self, rid: int) -> bool:
        """Wait until the verify worker has published request `rid` (False: it already finished it)."""
        deadline = time.monotonic() + self.wait_timeout_s
        while time.monotonic() < deadline:
            self.state.beat(Clock.DRAFT_HEARTBEAT)
            is_started = self.side.is_started(rid)
            if is_started is not None:
                return is_started
            time.sleep(IDLE_SLEEP_S)
        return False

    def _reconcile(self, length: int, n_prompt: int) -> int:
        """Make draft_tokens agree with the commit; crop the KV cache; return the new length."""
        state = self.state
        self.channel.sync_host()
        num_committed = self.side.num_committed()
        first_bad = first_disagreement(state.draft_tokens, state.committed_tokens, n_prompt, length, num_committed)
        if first_bad >= num_committed:         # draft agrees with everything committed: keep it all
            return length
        self.num_discarded += max(0, length - first_bad)
        self.channel.overwrite(first_bad, state.committed_tokens[first_bad:num_committed])
        sync_cache(self.runner, state.draft_tokens[:num_committed], num_consistent=first_bad)
        return num_committed
