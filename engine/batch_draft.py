"""`sync` with continuous batching: the draft model proposes tokens for every decoding sequence at once.

    drafter = BatchDrafter(draft_runner, max_catch_up=64, max_verify_rows=9)   # the sync draft, in the verify worker
    proposals = drafter.propose(runs)                       # before the verify pass: k_i draft tokens each
    drafter.observe(run, c, num_accepted, proposal, out)    # after its commit: crop the draft KV to what stays

Each sequence keeps its draft KV in a slot of its own (run.draft_slot). One propose = rounds of
one LeanDecoder.forward_batch each, over the sequences still drafting:

    round 0   row i: the tokens its draft slot lacks (committed[n_i:c_i - 1]) + the pending token
    round r   row i: its draft token r - 1                                          [1]
    logits    the draft's output layer once per round over the last row of each     [B_r, V]
    choose    seq.chooser.draft (the same noise / q as a lone sync request)

k_i = min(the sequence's own budget (cost model or num_speculative_tokens), room left before
max_len), then cut, largest first, until the verify pass holds at most `max_verify_rows` rows
(sum of 1 + k_i): the verify's cost curve is measured up to that many tokens, and past it a pass
costs more than one sequence's curve says (compute-bound on CPU: 8 one-token rows cost ~2x one);
then cut further, largest first, where the cost model predicts more tokens per second for the
pass (cost_model.best_sync_batch_sizes), so a full batch drafts nothing and runs as `ar` would.
Only a sequence that
drafts this step feeds its draft slot; one lagging by more than `max_catch_up` tokens (a long
prompt, or many steps without drafting) catches up a chunk instead and proposes nothing until it is
level, so no row freezes the batch.

After the verify commits c + a tokens of a sequence, its draft slot keeps positions < c + a:
committed[:c] (fed) and the a accepted draft tokens (fed, except the last drafted one, never fed).
"""
from __future__ import annotations

import time

import torch

from engine.cost_model import best_sync_batch_sizes
from engine.decoder import KVSlot, LeanDecoder
from engine.messages import TokensOut
from engine.models import ModelRunner
from engine.proposers import Proposal, count_local_draft_waste, count_local_rollback, fit_verify_rows


class BatchDrafter:
    def __init__(self, runner: ModelRunner, max_catch_up: int, max_verify_rows: int):
        if not isinstance(runner.decoder, LeanDecoder):
            raise ValueError("sync batching needs the lean decoder for the draft model too")
        self.runner, self.decoder = runner, runner.decoder
        self.max_catch_up, self.max_verify_rows = max_catch_up, max_verify_rows

    def new_slot(self) -> KVSlot:
        return self.decoder.new_slot()

    def start(self, seq) -> None:                                    # its draft slot comes with its verify slot
        self.runner.score_prompt(seq.request_id, seq.token_ids)      # draft_vocab_size: its prompt's ids too

    def propose(self, runs: list, num_prompt_left: int = 0) -> dict[int, Proposal]:
        """Draft tokens for each of `runs` (Running: .seq, .draft_slot), by request id; k_i from seq.budget."""
        if not runs:
            return {}
        start = time.perf_counter()
        proposals = {run.seq.request_id: Proposal(max(0, min(run.seq.budget.num_to_draft(),
                                                             run.seq.max_len - run.seq.num_committed - 1)))
                     for run in runs}
        self._fit_verify_rows(list(proposals.values()))
        self._fit_costs(runs, proposals)
        first_rows = {}                                              # the draft slot's lag, the pending token last
        for run in runs:
            rid, lag = run.seq.request_id, run.seq.token_ids[run.draft_slot.num_cached:]
            if proposals[rid].num_to_check == 0:
                continue                                             # nothing to draft: the lag can wait
            if len(lag) > self.max_catch_up + 1:
                first_rows[rid] = lag[:self.max_catch_up]           # a long lag (a prompt): a chunk now, no proposal
                proposals[rid].num_to_check = 0
            else:
                first_rows[rid] = lag
        by_id = {run.seq.request_id: run for run in runs}
        rows = first_rows                                            # request id -> token ids to feed
        while rows:
            order = list(rows)
            hidden = self.decoder.forward_batch([(by_id[rid].draft_slot, self._ids(rows[rid])) for rid in order])
            last_rows = torch.tensor([len(rows[rid]) for rid in order]).cumsum(0) - 1      # each row's last token
            drafting = [i for i, rid in enumerate(order) if proposals[rid].num_to_check > 0]
            logits = self.runner.logits(hidden[last_rows[drafting]]) if drafting else None     # [B_r, V]
            rows = {}
            for j, i in enumerate(drafting):
                rid = order[i]
                seq, proposal = by_id[rid].seq, proposals[rid]
                seq.stats.num_draft_forwards += 1
                token, q = seq.chooser.draft(logits[j:j + 1], seq.output_ids + proposal.draft_ids)
                proposal.draft_ids.append(int(token[0]))
                if q is not None:                                    # rejection sampling: q rows [K, V]
                    proposal.draft_probs = q if proposal.draft_probs is None else torch.cat([proposal.draft_probs, q])
                if len(proposal.draft_ids) < proposal.num_to_check:
                    rows[rid] = proposal.draft_ids[-1:]
        busy_s = (time.perf_counter() - start) / max(1, len(runs))
        for run in runs:
            run.seq.stats.draft_busy_s += busy_s
        return proposals

    def _fit_verify_rows(self, proposals: list[Proposal]) -> None:
        """Cut the largest proposals by one until sum(1 + k_i) <= max_verify_rows (or all are 0)."""
        sizes = fit_verify_rows([p.num_to_check for p in proposals], self.max_verify_rows)
        for proposal, size in zip(proposals, sizes):
            proposal.num_to_check = size

    @staticmethod
    def _fit_costs(runs: list, proposals: dict[int, Proposal]) -> None:
        """Cut further where the cost model predicts more tokens per second for the whole pass
        (cost_model.best_sync_batch_sizes: a full batch drafts nothing); fixed settings win."""
        budget = runs[0].seq.budget
        if budget is None or budget.num_fixed or budget.verify is None or budget.draft is None:
            return
        sizes = best_sync_batch_sizes(budget.verify, budget.draft, [
            (proposals[run.seq.request_id].num_to_check, run.seq.budget.acceptance.rate) for run in runs])
        for run, size in zip(runs, sizes):
            proposal = proposals[run.seq.request_id]
            run.seq.stats.num_wide_steps += size == 0 < proposal.num_to_check
            proposal.num_to_check = size

    def observe(self, run, num_committed_before: int, num_accepted: int, proposal: Proposal,
                out: TokensOut) -> None:
        """After the verify committed `out` for run.seq: keep the draft KV that still matches."""
        run.draft_slot.num_cached = min(run.draft_slot.num_cached, num_committed_before + num_accepted)
        count_local_rollback(run.seq, proposal, out)

    def finish(self, seq) -> None:
        self.runner.forget_prompt(seq.request_id)
        count_local_draft_waste(seq)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.runner.device)
