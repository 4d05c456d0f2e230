"""AMUSD with continuous batching: both workers decode every running request, one row of shared
state per sequence.

    verify worker: BatchDecoder(..., drafter=SharedDrafts(state, ...))   engine/batch_decode.py
    draft worker:  AsyncBatchDrafter(runner, state, ...)                  this file

Rows (engine/shared_state.py: `state.slots[i]`) hold what one sequence held before: committed
tokens, draft tokens and the control fields of engine/async_decode.py. Within a row the protocol
is that file's, unchanged (same fields, same single writers, same order of writes, invariant I per
row): the verify's half is SharedDraftProposer over the row, the draft's half is below, per row.
What batching adds:

    field / act                       writer   order and meaning
    row i <- request R                verify   SharedDrafts.start: row i's start_request (prompt ->
                                               NUM_COMMITTED -> EPOCH += 1 -> REQUEST_ID = R), THEN
                                               LAST_PUBLISHED_REQUEST_ID = R (rows fill in request order)
    row i free                        verify   SharedDrafts.finish: finish_request (REQUEST_ID = 0);
                                               the row's next request bumps its EPOCH again
    IS_DRAFT_PAUSED                   verify   1 before a pass widens onto the draft's cores, 0 after it
                                               narrows again (SharedDrafts: wide passes); while 1 the
                                               draft follows the rows but does not draft
    the draft follows the rows        draft    reads LAST_PUBLISHED first, then every row's REQUEST_ID:
                                               a request it holds a StartRequest for that sits in a row
                                               starts there; one <= LAST_PUBLISHED in no row has already
                                               finished (its StartRequest is dropped); a row whose
                                               REQUEST_ID changed ends what the draft did there

Invariant I holds per row for the reasons given in engine/async_decode.py: every EPOCH a row's
draft adopts was read (EPOCH first, then REQUEST_ID) while that row ran that request, the verify
bumps a row's EPOCH when a new request takes it, and it uses a row's draft tokens only while
DRAFT_EPOCH == EPOCH. So a late write for a request that has left the row (the draft learns of
the change one loop turn later) can never be mistaken for the new request's. Nobody waits for
anybody: the verify's pass checks whatever each row has drafted (0 tokens: that row decodes as
`ar`), the draft never waits for the verify.

One draft step (AsyncBatchDrafter.step), over the rows that may draft (< max_draft_lead ahead of
their commit, short of max_len):

    reconcile  a row whose EPOCH moved: draft_tokens agree with the commit, KV cropped to the first
               position that differed, NUM_DRAFTED -> DRAFT_EPOCH (adopt)
    rows       row i feeds what its KV lacks: draft_tokens[kv_i : length_i] (usually the one pending
               token; after a rollback the committed tokens past the crop; a new prompt in chunks)
    pass       LeanDecoder.forward_batch over all rows -> hidden [N, H]; the output layer once over
               the last position of each row that is level with its tokens  [B, V]
    choose     TokenChooser.draft per row (the coupled noise of its own request), publish the token

Coupled sampling and greedy only (a request's tokens come out as `ar`'s: batch-invariant passes,
the verify decides); rejection sampling keeps one request at a time (config.async_unbatched_reason).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from engine.async_decode import IDLE_SLEEP_S, SharedDraftProposer, first_disagreement
from engine.cost_model import ForwardCosts, prefer_wide_pass
from engine.decoder import KVSlot, LeanDecoder
from engine.kv_budget import kv_tokens_needed
from engine.logits_processors import MakeGrammar, build_logits_processors, stop_token_ids
from engine.messages import StartRequest, TokensOut
from engine.models import MIN_WIDE_PREFILL_TOKENS, ModelRunner
from engine.proposers import NgramGuesses, Proposal, fit_verify_rows
from engine.shared_state import (Ctrl, DraftSide, SharedState, SlotState, VerifySide, is_draft_paused, newest_started,
                                 pause_draft, publish_started)
from engine.token_channel import HostDraftChannel
from engine.token_chooser import DRAFT_STREAM, TokenChooser


PAUSED_SLEEP_S = 0.005     # a paused draft looks this seldom: its polling would slow the widened verify


class SharedDrafts:
    """The verify's half: each running sequence proposes what the draft worker drafted in its row.

    Wide passes: with the measured costs (PassCosts) and `wide` (the draft's cores as well), each
    pass first asks the cost model (prefer_wide_pass) whether checking every row's proposals beside
    the draft beats checking pending tokens only on both workers' cores; when it does not, the draft
    is paused and the pass runs wide, as `ar` batched would (a full CPU batch is compute-bound).
    """

    def __init__(self, state: SharedState, max_verify_rows: int, verify_lookup_ngram: int = 0, wide=None):
        self.state, self.max_verify_rows, self.lookup_ngram = state, max_verify_rows, verify_lookup_ngram
        for slot in state.slots:                 # a restarted verify ends what its predecessor left in a row
            if slot.get(Ctrl.REQUEST_ID):
                VerifySide(slot).finish_request(slot.get(Ctrl.REQUEST_ID))
        pause_draft(state, False)
        self.free_rows = list(range(len(state.slots)))
        self.proposers: dict[int, tuple[int, object]] = {}       # request id -> (row, its proposer)
        self.wide = wide                                          # engine.models.PrefillPlacement | None
        self.costs: tuple[ForwardCosts, ForwardCosts, ForwardCosts] | None = None     # (narrow, wide, draft)
        self.is_wide = False
        self._widened = contextlib.ExitStack()

    def use_costs(self, narrow: ForwardCosts, wide: ForwardCosts, draft: ForwardCosts) -> None:
        self.costs = (narrow, wide, draft)

    def new_slot(self) -> None:
        return None                              # the draft's KV lives in the draft worker

    def start(self, seq) -> None:
        """Before the verify's prefill: publish the request in a free row (the draft may start)."""
        row = self.free_rows.pop(0)
        slot = self.state.slots[row]
        proposer = SharedDraftProposer(VerifySide(slot), HostDraftChannel(slot))
        proposer = NgramGuesses(proposer, self.lookup_ngram) if self.lookup_ngram else proposer
        proposer.start(seq)
        if self.costs is not None:
            seq.budget.price_with(self.costs[0])     # beside the draft it runs at the narrow curve, not alone
        publish_started(self.state, seq.request_id)
        self.proposers[seq.request_id] = (row, proposer)

    def propose(self, runs: list, num_prompt_left: int = 0) -> dict[int, Proposal]:
        """What each row has drafted (+ n-gram guesses), cut so the pass has at most max_verify_rows
        rows; none in a wide pass (num_prompt_left: prompt tokens the batch still has to prefill)."""
        proposals = {run.seq.request_id: self.proposers[run.seq.request_id][1].propose(run.seq) for run in runs}
        is_wide = self._set_wide(self._prefers_wide(runs, num_prompt_left))
        for run in runs:
            run.seq.stats.num_wide_steps += is_wide
            if is_wide:
                run.seq.budget.record_nothing_checked()   # let the estimate recover
        sizes = fit_verify_rows([len(p.draft_ids) + len(p.guess_ids) for p in proposals.values()], self.max_verify_rows)
        for proposal, size in zip(proposals.values(), sizes):
            proposal.draft_ids = proposal.draft_ids[:0 if is_wide else size]
            proposal.guess_ids = proposal.guess_ids[:0 if is_wide else size - len(proposal.draft_ids)]
        return proposals

    def _prefers_wide(self, runs: list, num_prompt_left: int) -> bool:
        """Wide while a long prompt is prefilled (as engine/models.py's PrefillPlacement does alone),
        else as the cost model says for the decoding rows."""
        if self.wide is None:
            return False
        if num_prompt_left >= MIN_WIDE_PREFILL_TOKENS:
            return True
        if not runs or self.costs is None:
            return False
        budgets = [run.seq.budget for run in runs]
        sizes = fit_verify_rows([budget.num_to_check() for budget in budgets], self.max_verify_rows)
        return prefer_wide_pass(*self.costs, [(n, budget.acceptance.rate) for n, budget in zip(sizes, budgets)])

    def _set_wide(self, is_wide: bool) -> bool:
        """Pause the draft, then widen onto its cores; or come back, then let it draft again."""
        if is_wide and not self.is_wide:
            pause_draft(self.state, True)
            self._widened.enter_context(self.wide.widened())
        elif self.is_wide and not is_wide:
            self._widened.close()
            pause_draft(self.state, False)
        self.is_wide = is_wide
        return is_wide

    def observe(self, run, num_committed_before: int, num_accepted: int, proposal: Proposal, out: TokensOut) -> None:
        self.proposers[run.seq.request_id][1].observe(run.seq, proposal, out)

    def finish(self, seq) -> None:
        row, proposer = self.proposers.pop(seq.request_id)
        proposer.finish(seq)                                     # REQUEST_ID = 0: the draft leaves the row
        self.free_rows.append(row)
        if not self.proposers:
            self._set_wide(False)                                # idle: the draft's cores are its own again


@dataclass
class DraftRow:
    """The draft's state of one request in one row."""
    request_id: int
    slot: SlotState
    side: DraftSide
    channel: HostDraftChannel
    kv: KVSlot
    chooser: TokenChooser
    num_prompt_tokens: int
    max_len: int
    length: int                          # draft_tokens[:length] is the draft's sequence
    epoch: int = -1                      # the EPOCH its tokens were last reconciled with
    num_drafted_total: int = 0
    num_discarded: int = 0
    num_forwards: int = 0
    busy_s: float = 0.0

    def record_stats(self) -> None:
        self.side.record_stats(self.num_drafted_total, self.num_discarded, self.busy_s, self.num_forwards)


class AsyncBatchDrafter:
    """The draft's half: follows the rows, drafts one token for every row that may, in one pass."""

    def __init__(self, runner: ModelRunner, state: SharedState, max_draft_lead: int, max_model_len: int,
                 prefill_chunk_tokens: int, max_num_batched_tokens: int, wait_timeout_s: float,
                 eos_token_ids: list[int] = (), make_grammar: MakeGrammar | None = None):
        if not isinstance(runner.decoder, LeanDecoder):
            raise ValueError("async batching needs the lean decoder for the draft model")
        self.runner, self.decoder, self.state = runner, runner.decoder, state
        self.max_draft_lead, self.max_model_len = max_draft_lead, max_model_len
        self.prefill_chunk_tokens, self.max_num_batched_tokens = prefill_chunk_tokens, max_num_batched_tokens
        self.wait_timeout_s = wait_timeout_s
        self.eos_token_ids, self.make_grammar = list(eos_token_ids), make_grammar
        self.kv_slots = [self.decoder.new_slot() for _ in state.slots]     # row i's KV, reused by its requests
        self.rows: dict[int, DraftRow] = {}                                  # row index -> what runs there
        self.starts: dict[int, tuple[StartRequest, float]] = {}             # request id -> (start, give up at)

    @property
    def is_busy(self) -> bool:
        return bool(self.rows or self.starts)

    def add(self, req: StartRequest) -> None:
        """A StartRequest for the draft: it starts once the verify puts it in a row."""
        self.starts[req.request_id] = (req, time.monotonic() + self.wait_timeout_s)

    @torch.inference_mode()
    def step(self, emit=None) -> None:
        self._follow_rows()
        if is_draft_paused(self.state):
            time.sleep(PAUSED_SLEEP_S)                   # the verify's second thread runs on this core now
            return
        feeds = self._plan()                                                 # [(row, ids, is_drafting)]
        if not feeds:
            time.sleep(IDLE_SLEEP_S)
            return
        start = time.perf_counter()
        hidden = self.decoder.forward_batch([(row.kv, self._ids(ids)) for row, ids, _ in feeds])   # [N, H]
        ends = torch.tensor([len(ids) for _, ids, _ in feeds]).cumsum(0) - 1                       # each row's last
        drafting = [i for i, (_, _, is_drafting) in enumerate(feeds) if is_drafting]
        logits = self.runner.logits(hidden[ends[drafting]]) if drafting else None                 # [B, V]
        for j, i in enumerate(drafting):
            row = feeds[i][0]
            tokens = row.slot.draft_tokens
            chosen, _ = row.chooser.draft(logits[j:j + 1], tokens[row.num_prompt_tokens:row.length])
            row.channel.publish(row.length, chosen[0])          # draft_tokens[length], then NUM_DRAFTED
            row.length += 1
            row.num_drafted_total += 1
            row.num_forwards += 1
        busy_s = (time.perf_counter() - start) / len(feeds)
        for row, _, _ in feeds:
            row.busy_s += busy_s
            row.record_stats()

    def _follow_rows(self) -> None:
        newest = newest_started(self.state)                  # first: see publish_started
        in_rows = set()
        for index, slot in enumerate(self.state.slots):
            request_id = slot.get(Ctrl.REQUEST_ID)
            in_rows.add(request_id)
            row = self.rows.get(index)
            if row is not None and row.request_id != request_id:
                del self.rows[index]                         # it ended; the KV slot stays for the row's next request
                self.runner.forget_prompt(index)
                row = None
            if row is None and request_id in self.starts:
                self.rows[index] = self._start(index, self.starts.pop(request_id)[0])
        now = time.monotonic()
        for request_id, (_, give_up_at) in list(self.starts.items()):
            if (request_id <= newest and request_id not in in_rows) or now > give_up_at:
                del self.starts[request_id]                  # already over (or never published)

    def _start(self, index: int, req: StartRequest) -> DraftRow:
        slot, prompt = self.state.slots[index], req.prompt_token_ids
        processors = build_logits_processors(req.params, prompt, stop_token_ids(req.params, self.eos_token_ids),
                                             self.make_grammar)
        kv = self.kv_slots[index]
        kv.num_cached = 0
        max_len = kv_tokens_needed(len(prompt), req.params.max_tokens, self.max_model_len)
        kv.limit_capacity(max_len)
        row = DraftRow(req.request_id, slot, DraftSide(slot), HostDraftChannel(slot), kv,
                       TokenChooser(req.params, "coupled", DRAFT_STREAM, processors), len(prompt), max_len, len(prompt))
        row.channel.overwrite(0, prompt)
        row.record_stats()
        self.runner.score_prompt(index, prompt)               # draft_vocab_size: its prompt's ids too
        return row

    def _plan(self) -> list[tuple[DraftRow, list[int], bool]]:
        """(row, token ids to feed, does it draft a token) for every row that may draft now: after
        reconciling rows whose EPOCH moved; a row lagging by more than the prompt room catches up a chunk."""
        ready = []
        for row in self.rows.values():
            epoch = row.side.epoch_while_running(row.request_id)
            if epoch is None:
                continue                                     # ended: _follow_rows drops it next step
            if epoch != row.epoch:
                start = time.perf_counter()
                self._reconcile(row)
                row.side.adopt(epoch, row.length)            # NUM_DRAFTED, then DRAFT_EPOCH
                row.epoch = epoch
                row.busy_s += time.perf_counter() - start
                row.record_stats()
            if row.length - row.side.num_committed() < self.max_draft_lead and row.length < row.max_len:
                ready.append(row)
        lags = [row.length - row.kv.num_cached for row in ready]                 # tokens its KV lacks
        num_level = sum(lag <= 1 for lag in lags)
        room = self.prefill_chunk_tokens if num_level == 0 else \
            max(self.max_num_batched_tokens - num_level, self.max_num_batched_tokens // 4, 1)
        feeds = []
        for row, lag in zip(ready, lags):
            num_fed = lag if lag <= 1 else min(lag, room)       # the pending token, or a chunk of the lag
            if lag > 1:
                if room <= 0:
                    continue
                room -= num_fed
            ids = row.slot.draft_tokens[row.kv.num_cached:row.kv.num_cached + num_fed].tolist()
            feeds.append((row, ids, num_fed == lag))              # level with its tokens: draft the next one
        return feeds

    def _reconcile(self, row: DraftRow) -> None:
        """Make the row's draft tokens agree with its commit; crop its KV to the first difference."""
        committed, num_committed = row.slot.committed_tokens, row.side.num_committed()
        first_bad = first_disagreement(row.slot.draft_tokens, committed, row.num_prompt_tokens, row.length,
                                       num_committed)
        if first_bad >= num_committed:                       # agrees with everything committed: keep it all
            return
        row.num_discarded += max(0, row.length - first_bad)
        row.channel.overwrite(first_bad, committed[first_bad:num_committed])
        row.kv.num_cached = min(row.kv.num_cached, first_bad)
        row.length = num_committed

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return self.runner._input_ids(torch.tensor(ids, dtype=torch.long, device=self.runner.device).view(1, -1))[0]
