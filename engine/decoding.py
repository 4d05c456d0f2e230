"""Verify-side decoding shared by all three modes: the verify step and the one decode loop.

The verify step (gpt-fast's speculative_decode, generalised to "0..K draft tokens"):

    input   [t_{c-1}, d_c, ..., d_{c+K-1}]            pending token + K draft tokens     [K+1]
    logits  verify model over that input               one row per position c..c+K        [K+1, V]
    y_i     TokenChooser.verify(logits)                 target token at each position      [K+1]
            (row i processed with its own context: committed output + d_c..d_{c+i-1})
    m       longest prefix with d_i == y_i              accepted draft tokens, 0 <= m <= K
    commit  y_c .. y_{c+m}                              m accepted + 1 correction/bonus token

With greedy or coupled (seeded Gumbel-max) choice, y_i is exactly the token the verify model
alone (`ar`) emits at position i given the same prefix, so the committed text equals `ar`'s.
KV cache: before the step it holds positions [0, c-1); the forward appends K+1 positions; the
valid ones afterwards are [0, c+m), so we crop to c+m and y_{c+m} becomes the pending token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.cost_model import SpeculationBudget
from engine.kv_budget import kv_tokens_needed
from engine.logits_processors import MakeGrammar, build_logits_processors, stop_token_ids
from engine.messages import RequestStats, SamplingParams, StartRequest, TokenLogprob, TokensOut
from engine.models import ModelRunner
from engine.sampling import top_logprobs
from engine.token_chooser import VERIFY_STREAM, TokenChooser

PROMPT_LOGPROB_ROWS = 64    # prompt positions per output-layer call when scoring the prompt (echo)


@dataclass
class Sequence:
    """The committed sequence of one request, as the verify worker sees it."""
    request_id: int
    token_ids: list[int]                 # prompt + committed output
    num_prompt_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    max_len: int                         # prompt + max_tokens, clipped to the model length
    chooser: TokenChooser
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    prompt_logprobs: list[TokenLogprob | None] | None = None   # echo: computed at prefill, sent once
    budget: SpeculationBudget | None = None   # how many tokens its steps propose (Verifier.start, cost model)

    @property
    def num_committed(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        """The committed output (after the prompt): the context of the logits processors."""
        return self.token_ids[self.num_prompt_tokens:]


def new_sequence(req: StartRequest, eos_token_ids: list[int], max_model_len: int, scheme: str,
                 make_grammar: MakeGrammar | None = None) -> Sequence:
    stop_ids = stop_token_ids(req.params, eos_token_ids)
    processors = build_logits_processors(req.params, req.prompt_token_ids, stop_ids, make_grammar)
    max_len = kv_tokens_needed(len(req.prompt_token_ids), req.params.max_tokens, max_model_len)
    seq = Sequence(req.request_id, list(req.prompt_token_ids), len(req.prompt_token_ids), req.params,
                   stop_ids, max_len, TokenChooser(req.params, scheme, VERIFY_STREAM, processors))
    seq.stats.num_prompt_tokens = len(req.prompt_token_ids)
    return seq


class Verifier:
    """Runs verify steps for one sequence on the verify model and commits their tokens.

    `budget` holds the worker's measured cost curves; each sequence gets its own copy (`start`),
    which learns that request's acceptance rate from every step and says how many proposed tokens
    its next step should check (engine/cost_model.py).
    """

    def __init__(self, runner: ModelRunner, budget: SpeculationBudget):
        self.runner = runner
        self.budget = budget

    def start(self, seq: Sequence) -> None:
        """A new sequence's own speculation budget (acceptance from the prior)."""
        seq.budget = self.budget.for_request()

    def prefills_wide(self, seq: Sequence) -> bool:
        """Will `prefill(seq)` run on the draft worker's cores too (engine/models.py: PrefillPlacement)?"""
        return self.runner.prefills_wide(seq.token_ids, is_scoring=seq.params.num_prompt_logprobs is not None)

    def prefill(self, seq: Sequence) -> None:
        """Fill the KV cache with the prompt; with num_prompt_logprobs, also score every prompt token
        (the prefix cache is bypassed then: each position's logits are computed)."""
        start = time.perf_counter()
        num_top = seq.params.num_prompt_logprobs
        if num_top is None:
            seq.stats.num_cached_prompt_tokens = self.runner.prefill(seq.token_ids)
        else:
            hidden: list[torch.Tensor] = []
            self.runner.prefill(seq.token_ids, hidden_out=hidden)
            seq.prompt_logprobs = [None] + self.prompt_logprobs(hidden, seq.token_ids[1:], num_top)
        seq.stats.prefill_s = time.perf_counter() - start
        seq.stats.verify_busy_s += seq.stats.prefill_s

    def prompt_logprobs(self, hidden: list[torch.Tensor], next_ids: list[int], num_top: int) -> list[TokenLogprob]:
        """Each prompt token's logprob (and top-N) from the hidden state of the position before it,
        through the output layer a few rows at a time (a [prompt, V] logits matrix can be GBs)."""
        logprobs: list[TokenLogprob] = []
        rows = torch.cat(hidden) if hidden else None                           # [n_prompt - 1, H]
        for start in range(0, len(next_ids), PROMPT_LOGPROB_ROWS):
            logits = self.runner.logits(rows[start:start + PROMPT_LOGPROB_ROWS])  # [rows, V]
            logprobs += top_logprobs(logits, torch.tensor(next_ids[start:start + PROMPT_LOGPROB_ROWS]), num_top)
        return logprobs

    def step(self, seq: Sequence, draft_ids: list[int], guess_ids: list[int] = (),
             draft_probs: torch.Tensor | None = None) -> TokensOut:
        """One verify forward over pending + draft_ids + guess_ids; commits 1..K+1 tokens.

        guess_ids: n-gram lookup guesses continuing the draft (checked exactly like draft tokens,
        counted apart so the acceptance rate stays the draft model's). draft_probs[K, V]: the
        distributions the draft sampled from (rejection sampling only).
        """
        start = time.perf_counter()
        c = seq.num_committed
        proposal = (list(draft_ids) + list(guess_ids))[: max(0, seq.max_len - c - 1)]   # never past the end
        logits = self.runner.forward([seq.token_ids[-1]] + proposal)     # [K+1, V]
        out, num_accepted = self.commit(seq, logits, proposal, len(draft_ids), draft_probs)
        self.runner.crop(c + num_accepted)
        seq.stats.verify_busy_s += time.perf_counter() - start
        return out

    def commit(self, seq: Sequence, logits: torch.Tensor, proposal: list[int], num_draft_ids: int,
               draft_probs: torch.Tensor | None = None) -> tuple[TokensOut, int]:
        """Choose and commit the tokens of one verify forward: logits [K+1, V] over pending + proposal
        (its first num_draft_ids tokens from the draft). Returns (the output, proposals accepted);
        the sequence's budget learns the acceptance."""
        num_accepted, new_ids = seq.chooser.verify(logits, seq.output_ids, proposal, draft_probs)
        new_ids = self._truncate_at_stop(seq, new_ids)
        num_draft = min(num_draft_ids, len(proposal))
        seq.budget.record(num_draft, min(num_accepted, num_draft))   # the draft's rate: guesses come after it
        seq.token_ids.extend(new_ids)
        logprobs = None
        if seq.params.num_logprobs is not None:
            logprobs = top_logprobs(logits[: len(new_ids)], torch.tensor(new_ids), seq.params.num_logprobs)
        stats = seq.stats
        num_committed_from_proposal = min(num_accepted, len(new_ids))
        stats.num_verify_steps += 1
        stats.num_proposed_tokens += len(proposal)
        stats.num_generated_tokens += len(new_ids)
        stats.num_draft_tokens += num_draft
        stats.num_accepted_tokens += min(num_committed_from_proposal, num_draft)
        stats.num_lookup_tokens += len(proposal) - num_draft
        stats.num_lookup_accepted += max(0, num_committed_from_proposal - num_draft)
        stats.num_drafts += bool(num_draft)
        _count_per_position(stats.num_draft_tokens_per_pos, num_draft)
        _count_per_position(stats.num_accepted_tokens_per_pos, min(num_committed_from_proposal, num_draft))
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None       # sent with the first tokens only
        return TokensOut(seq.request_id, new_ids, logprobs, prompt_logprobs), num_accepted

    @staticmethod
    def _truncate_at_stop(seq: Sequence, new_ids: list[int]) -> list[int]:
        for i, tok in enumerate(new_ids):
            if tok in seq.stop_ids:
                seq.finish_reason = "stop"
                return new_ids[: i + 1]
        room = seq.max_len - seq.num_committed
        if len(new_ids) >= room:
            seq.finish_reason = "length"
            return new_ids[:room]
        return new_ids


def _count_per_position(counts: list[int], num_positions: int) -> None:
    """counts[i] += 1 for i < num_positions (growing the list as needed)."""
    counts.extend([0] * (num_positions - len(counts)))
    for i in range(num_positions):
        counts[i] += 1


def run_decode(seq: Sequence, verifier: Verifier, proposer, emit, should_stop) -> None:
    """One request on the verify worker, in every mode: the proposer (engine/proposers.py) says what
    each verify step checks; the step commits 1..K+1 tokens; `emit` streams them."""
    verifier.start(seq)
    proposer.start(seq)
    verifier.prefill(seq)
    while seq.finish_reason is None:
        if should_stop():
            seq.finish_reason = "cancelled"
            break
        proposal = proposer.propose(seq)
        out = verifier.step(seq, proposal.draft_ids, proposal.guess_ids, proposal.draft_probs)
        proposer.observe(seq, proposal, out)
        emit(out)
    proposer.finish(seq)


def sync_cache(runner: ModelRunner, token_ids, num_consistent: int | None = None) -> None:
    """Make the cache hold exactly token_ids[:-1], reusing its first `num_consistent` positions.

    num_consistent: how many leading cached positions are known to still match token_ids
    (default: all cached ones up to len - 1). Crops the rest, then feeds the missing tokens in one
    forward, so a token is never fed twice.
    """
    target = len(token_ids) - 1
    keep = min(runner.num_cached, target, num_consistent if num_consistent is not None else target)
    runner.crop(keep)
    if keep < target:
        runner.forward(list(token_ids[keep:target]), last_only=True)
