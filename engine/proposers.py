"""Where a verify step's proposed tokens come from: the one decode loop's pluggable proposers.

    mode    proposer                                  proposes
    ar      NoProposer                                nothing: each step checks the pending token only
    sync    LocalDraftProposer                        k draft-model tokens, drafted in this process first
    async   SharedDraftProposer (engine/async_decode) whatever the draft worker has drafted by now
    any     NgramGuesses(proposer)                    + n-gram lookup guesses continuing those tokens

A proposer's life for one request (engine/decoding.py, run_decode):

    start(seq)                       before the verify's prefill
    propose(seq) -> Proposal         before every verify step (how many: seq.budget)
    observe(seq, proposal, out)      after the step committed out.token_ids
    finish(seq)                      after the last step (stats)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.decoding import Sequence
from engine.messages import TokensOut
from engine.models import ModelRunner
from engine.ngram import LookupBudget, propose_from_ngrams


@dataclass
class Proposal:
    """What the next verify step checks after the pending token: draft_ids, then guess_ids."""
    num_to_check: int                                   # the budget's choice for this step
    draft_ids: list[int] = field(default_factory=list)
    guess_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None             # [len(draft_ids), V] the draft's q (rejection sampling)


class NoProposer:
    """`ar`: the verify model alone, one token per step."""

    def start(self, seq: Sequence) -> None:
        pass

    def propose(self, seq: Sequence) -> Proposal:
        return Proposal(num_to_check=0)

    def observe(self, seq: Sequence, proposal: Proposal, out: TokensOut) -> None:
        pass

    def finish(self, seq: Sequence) -> None:
        pass


class LocalDraftProposer(NoProposer):
    """`sync`: the draft model in this process drafts k tokens (k from the cost model, or fixed),
    one forward each; after the step its cache is cropped to the committed prefix. What it then
    lacks (the last draft token, never fed, when all were accepted; accepted guesses) is fed with
    the pending token in the next step's first forward, not in a forward of its own."""

    MAX_LAG_IN_ONE_FORWARD = 64           # a longer lag (many steps without drafting) is prefilled in chunks

    def __init__(self, drafter: ModelRunner):
        self.drafter = drafter

    def start(self, seq: Sequence) -> None:
        self.drafter.score_prompt(seq.request_id, seq.token_ids)     # draft_vocab_size: its prompt's ids too
        self.drafter.prefill(seq.token_ids)

    def propose(self, seq: Sequence) -> Proposal:
        start = time.perf_counter()
        num_draft = min(seq.budget.num_to_draft(), seq.max_len - seq.num_committed - 1)
        draft_ids: list[int] = []
        q_rows = []
        output_ids = seq.output_ids
        feed = self._lag(seq) if num_draft > 0 else []          # what the cache lacks, the pending token last
        for _ in range(max(0, num_draft)):
            seq.stats.num_draft_forwards += 1
            logits = self.drafter.forward(feed, last_only=True)                      # [1, V]
            token, q = seq.chooser.draft(logits, output_ids + draft_ids)
            draft_ids.append(int(token[0]))
            feed = draft_ids[-1:]
            if q is not None:
                q_rows.append(q)
        seq.stats.draft_busy_s += time.perf_counter() - start
        return Proposal(num_draft, draft_ids, draft_probs=torch.cat(q_rows) if q_rows else None)

    def _lag(self, seq: Sequence) -> list[int]:
        """The committed tokens the draft cache lacks (it holds a prefix of them), the pending one last."""
        lag = seq.token_ids[self.drafter.num_cached:]
        if len(lag) > self.MAX_LAG_IN_ONE_FORWARD:
            self.drafter.prefill(seq.token_ids)                 # chunked; keeps the cached prefix
            lag = seq.token_ids[-1:]
        return lag

    def observe(self, seq: Sequence, proposal: Proposal, out: TokensOut) -> None:
        """The cache held the committed prefix + the pending token + draft tokens 1..k-1, and the
        accepted ones match what was committed: keep at most token_ids[:-1]."""
        self.drafter.crop(seq.num_committed - 1)
        count_local_rollback(seq, proposal, out)

    def finish(self, seq: Sequence) -> None:
        self.drafter.forget_prompt(seq.request_id)
        count_local_draft_waste(seq)


def fit_verify_rows(sizes: list[int], max_rows: int) -> list[int]:
    """Proposal sizes k_i cut, the largest first, one at a time, until a batched verify pass holds at
    most max_rows rows (sum of 1 + k_i) or every k_i is 0: the verify's cost curve goes that far."""
    sizes = list(sizes)
    num_rows = sum(1 + k for k in sizes)
    while num_rows > max_rows and sizes and max(sizes) > 0:
        sizes[sizes.index(max(sizes))] -= 1
        num_rows -= 1
    return sizes


def count_local_rollback(seq: Sequence, proposal: Proposal, out: TokensOut) -> None:
    """sync (alone or batched): a step that committed fewer tokens than it drafted rolled the draft back."""
    seq.stats.num_rollbacks += len(out.token_ids) <= len(proposal.draft_ids) and seq.finish_reason is None


def count_local_draft_waste(seq: Sequence) -> None:
    """sync: every drafted token was checked, so the rejected ones are the draft's waste."""
    seq.stats.num_draft_tokens_wasted = seq.stats.num_draft_tokens - seq.stats.num_accepted_tokens
    seq.stats.num_draft_tokens_produced = seq.stats.num_draft_tokens


class NgramGuesses:
    """Wraps a proposer: where its tokens fall short of the step's budget, n-gram lookup guesses
    (the tokens that followed the last earlier occurrence of the context's suffix) continue them.
    A LookupBudget per request cuts the guesses to one probe once they stop hitting. Not with
    rejection sampling (its proposals must be drawn from the draft's q)."""

    def __init__(self, inner, max_ngram: int):
        self.inner, self.max_ngram = inner, max_ngram
        self.lookup = LookupBudget()
        self._num_accepted_before = 0

    def start(self, seq: Sequence) -> None:
        self.lookup = LookupBudget()
        self.inner.start(seq)

    def propose(self, seq: Sequence) -> Proposal:
        proposal = self.inner.propose(seq)
        room = proposal.num_to_check - len(proposal.draft_ids)
        if room > 0 and not seq.chooser.is_rejection:    # guesses are not drawn from q: keep rejection sampling pure
            context = np.asarray(seq.token_ids + proposal.draft_ids)
            proposal.guess_ids = propose_from_ngrams(context, self.max_ngram, self.lookup.num_guesses(room))
        self._num_accepted_before = seq.stats.num_lookup_accepted
        return proposal

    def observe(self, seq: Sequence, proposal: Proposal, out: TokensOut) -> None:
        self.lookup.record(len(proposal.guess_ids), seq.stats.num_lookup_accepted - self._num_accepted_before)
        self.inner.observe(seq, proposal, out)

    def finish(self, seq: Sequence) -> None:
        self.inner.finish(seq)
