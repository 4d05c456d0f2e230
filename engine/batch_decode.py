"""Continuous batching (`ar`; `sync` with engine/batch_draft.py; `async` with engine/async_batch.py):
the verify worker decodes every running request in one pass per step.

    batch = batch_decoder_for(verifier, config)     # max_num_seqs, prefill_chunk_tokens, the KV budget
    batch.admit(seq)                 # a request joins: a KV slot of its own (engine/decoder.py: KVSlot)
    batch.cancel(request_id)         # leaves at the next step
    batch.step(emit)                 # one LeanDecoder.forward_batch over all of them; emits outputs

One step, for the running sequences s (in admission order):

    rows    s still prefilling: the next chunk of its prompt (all chunks together at most
            prefill_chunk_tokens per pass, and while others decode at most what
            max_num_batched_tokens leaves beside their tokens: a long prompt never freezes them)
            s decoding: its pending token, + its K_s proposed tokens (sync: drafted here; async:
            what the draft worker has drafted in its row, + n-gram guesses)    [1 + K_s]
    pass    forward_batch(rows) -> hidden [N, H]; the output layer once, over the decode rows
    commit  Verifier.commit per decoding sequence (the same choice, stop and stats code as a lone
            request): 1..K_s + 1 tokens; its KV slot then keeps the pending and accepted positions,
            i.e. every committed token but the new pending one (a rejection rolls back only s)
    leave   finished (stop / length) or cancelled: RequestDone, the slot back to the pool, still
            holding that request's KV: a new request takes the free slot sharing the longest prefix
            with its prompt and prefills only the rest (a shared system prompt, a follow-up turn)

KV memory (engine/kv_budget.py): a running slot never grows past its request's reservation
(prompt + max_tokens), the reservations of the running requests fit the budget (the supervisor
admits that way), and pooled slots are dropped, oldest first, when a new reservation needs room:
running reservations + pooled capacity <= budget tokens, always.

Stats: each pass with a decoding row is counted once, in the stats of its first decoding
sequence (`num_passes_by_batch_size[B - 1]` for a pass over B sequences), so that the counts
summed over requests are the batch-size histogram of the passes.

A sequence's tokens do not depend on what shares its pass (tests/test_decoder_batch.py for the
decoder, tests/test_batch_decode.py end to end): greedy and seeded outputs equal the request alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.batch_draft import BatchDrafter
from engine.decoder import KVSlot, LeanDecoder
from engine.decoding import Sequence, Verifier
from engine.kv_budget import KVBudget, available_host_bytes, kv_bytes_per_token
from engine.messages import RequestDone
from engine.models import common_prefix_length
from engine.proposers import Proposal


@dataclass
class Running:
    seq: Sequence
    slot: KVSlot                            # the verify's KV of this sequence
    draft_slot: KVSlot | None               # sync: the draft model's (engine/batch_draft.py)
    admitted_at: float
    prompt_hidden: list[torch.Tensor] = field(default_factory=list)    # prompt logprobs (echo) only

    @property
    def is_decoding(self) -> bool:
        """Its KV holds every committed token but the pending one: the prompt is prefilled."""
        return self.slot.num_cached >= len(self.seq.token_ids) - 1


@dataclass
class FreeSlot:
    """A finished request's KV, kept for a request sharing its prefix."""
    slot: KVSlot
    draft_slot: KVSlot | None
    token_ids: list[int]                    # what the verify slot holds


def batch_decoder_for(verifier: Verifier, config, draft_runner=None, shared_drafts=None,
                      draft_kv_bytes_per_token: int = 0) -> "BatchDecoder":
    """The batch an EngineConfig asks for (`sync`: with the local draft model; `async`: with the
    draft worker's rows, engine/async_batch.py, whose KV, `draft_kv_bytes_per_token`, counts in the
    budget too); ValueError where batching cannot run."""
    decoder = verifier.runner.decoder
    if not isinstance(decoder, LeanDecoder):
        raise ValueError("continuous batching needs the lean decoder (decoder: lean / auto on CPU)")
    drafter = BatchDrafter(draft_runner, config.max_num_batched_tokens, config.max_verify_tokens + 1) \
        if draft_runner is not None else shared_drafts
    per_token = draft_kv_bytes_per_token + sum(
        kv_bytes_per_token(len(d.layers), d.num_kv_heads, d.head_dim, d.dtype.itemsize)
        for d in [decoder] + ([drafter.decoder] if draft_runner is not None else []))
    available = available_host_bytes() if decoder.device.type == "cpu" else torch.cuda.mem_get_info(decoder.device)[0]
    budget = KVBudget.plan(config.kv_cache_memory_gb, config.max_num_seqs, config.max_model_len, per_token, available)
    return BatchDecoder(verifier, config.max_num_seqs, config.prefill_chunk_tokens, config.prefix_caching, budget,
                        config.max_num_batched_tokens, drafter)


class BatchDecoder:
    def __init__(self, verifier: Verifier, max_num_seqs: int, prefill_chunk_tokens: int,
                 is_prefix_cached: bool, kv_budget: KVBudget, max_num_batched_tokens: int,
                 drafter: BatchDrafter | None = None):
        self.verifier, self.runner, self.drafter = verifier, verifier.runner, drafter
        self.decoder: LeanDecoder = verifier.runner.decoder
        self.max_num_seqs, self.prefill_chunk_tokens = max_num_seqs, prefill_chunk_tokens
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_budget = kv_budget
        self.running: dict[int, Running] = {}
        self.cancelled: set[int] = set()
        self.is_prefix_cached = is_prefix_cached
        self._free_slots: list[FreeSlot] = []                      # oldest first

    @property
    def is_busy(self) -> bool:
        return bool(self.running)

    @property
    def num_kv_tokens_reserved(self) -> int:
        return sum(run.seq.max_len for run in self.running.values())

    @property
    def num_kv_tokens_held(self) -> int:
        """Running reservations + pooled capacity: what this batch may hold (<= the budget)."""
        return self.num_kv_tokens_reserved + sum(free.slot.capacity for free in self._free_slots)

    def admit(self, seq: Sequence) -> None:
        if len(self.running) >= self.max_num_seqs:
            raise RuntimeError(f"more than max_num_seqs = {self.max_num_seqs} requests sent to the batch")
        num_reserved = self.num_kv_tokens_reserved + seq.max_len
        if self.running and num_reserved > self.kv_budget.num_tokens:     # (alone, any request runs)
            raise RuntimeError(f"KV reservations of {num_reserved} tokens sent to a batch whose budget is "
                               f"{self.kv_budget.num_tokens}")
        free = self._slot_for(seq.token_ids[:-1])
        for slot in (free.slot, free.draft_slot):
            if slot is not None:
                slot.limit_capacity(seq.max_len)
        seq.stats.num_cached_prompt_tokens = free.slot.num_cached
        self.verifier.start(seq)                     # its own speculation budget (sync: its draft lengths)
        if self.drafter is not None:
            self.drafter.start(seq)                  # async: the draft worker may start on it now
        self.running[seq.request_id] = Running(seq, free.slot, free.draft_slot, time.perf_counter())
        while self._free_slots and self.num_kv_tokens_held > self.kv_budget.num_tokens:
            self._free_slots.pop(0)                                          # its KV goes back to the allocator

    def _slot_for(self, prefix: list[int]) -> FreeSlot:
        """The free slot(s) sharing the longest prefix with `prefix` (their KV kept for that many
        tokens), else new ones."""
        if not self._free_slots:
            return FreeSlot(self.decoder.new_slot(), self.drafter.new_slot() if self.drafter else None, [])
        shared = [common_prefix_length(free.token_ids, prefix) for free in self._free_slots]
        best = max(range(len(shared)), key=shared.__getitem__)
        free = self._free_slots.pop(best)
        free.slot.num_cached = shared[best] if self.is_prefix_cached else 0
        if free.draft_slot is not None:
            free.draft_slot.num_cached = min(free.draft_slot.num_cached, free.slot.num_cached)
        return free

    def cancel(self, request_id: int) -> None:
        if request_id in self.running:
            self.cancelled.add(request_id)

    @torch.inference_mode()
    def step(self, emit) -> None:
        for request_id in list(self.cancelled):
            self.running[request_id].seq.finish_reason = "cancelled"
        self.cancelled.clear()
        live = [run for run in self.running.values() if run.seq.finish_reason is None]
        decoding = [run for run in live if run.is_decoding]
        num_prompt_left = sum(len(run.seq.token_ids) - 1 - run.slot.num_cached for run in live if not run.is_decoding)
        proposals = self.drafter.propose(decoding, num_prompt_left) if self.drafter else {}
        num_decode_tokens = len(decoding) + sum(len(p.draft_ids) + len(p.guess_ids) for p in proposals.values())
        plan = self._plan(live, num_decode_tokens)                             # [(run, ids, is_decoding)]
        verify_start = time.perf_counter()
        rows = []
        for run, ids, is_decoding in plan:
            proposal = proposals.get(run.seq.request_id) if is_decoding else None
            ids = ids + proposal.draft_ids + proposal.guess_ids if proposal else ids   # pending + proposed tokens
            rows.append((run.slot, torch.tensor(ids, dtype=torch.long, device=self.runner.device)))
        if decoding:
            _count_pass(decoding[0].seq.stats, len(plan))
        if rows:
            hidden = self.decoder.forward_batch(rows)                           # [N, H]
            offset, decode_rows = 0, []
            for (_, ids), (run, _, is_decoding) in zip(rows, plan):
                rows_of_run = hidden[offset:offset + len(ids)]
                offset += len(ids)
                if is_decoding:
                    decode_rows.append(rows_of_run)                             # [1 + K_i, H]
                elif run.seq.params.num_prompt_logprobs is not None:
                    run.prompt_hidden.append(rows_of_run)
            # one output-layer call for all decoding rows: its weights (V x H) are read once per pass
            logits = self.runner.logits(torch.cat(decode_rows)) if decode_rows else None    # [sum(1 + K_i), V]
            offset = 0
            for run, rows_of_run in zip(decoding, decode_rows):
                self._commit(run, logits[offset:offset + len(rows_of_run)], proposals.get(run.seq.request_id), emit)
                offset += len(rows_of_run)
        busy_s = (time.perf_counter() - verify_start) / max(1, len(plan))
        for run, _, _ in plan:
            run.seq.stats.verify_busy_s += busy_s
        for request_id, run in list(self.running.items()):
            if run.seq.finish_reason is not None:
                self._leave(run, emit)

    def _commit(self, run: Running, logits: torch.Tensor, proposal: Proposal | None, emit) -> None:
        """logits [1 + K, V] over the pending token + K draft tokens: commit 1..K+1 tokens, keep the
        KV of the pending and accepted positions (the new pending token is not in it)."""
        seq = run.seq
        if run.prompt_hidden:
            seq.prompt_logprobs = [None] + self.verifier.prompt_logprobs(
                run.prompt_hidden, seq.token_ids[1:], seq.params.num_prompt_logprobs)
            run.prompt_hidden = []
        draft_ids = proposal.draft_ids if proposal else []
        c = seq.num_committed
        out, num_accepted = self.verifier.commit(seq, logits, draft_ids + (proposal.guess_ids if proposal else []),
                                                 len(draft_ids), proposal.draft_probs if proposal else None)
        run.slot.num_cached = c + num_accepted
        if self.drafter is not None and proposal is not None:
            self.drafter.observe(run, c, num_accepted, proposal, out)
        emit(out)

    def _plan(self, live: list[Running], num_decode_tokens: int) -> list[tuple[Running, list[int], bool]]:
        """(its Running, token ids to feed, is it decoding) per sequence in this pass: a decoding
        sequence feeds its pending token (sync: + its draft tokens, `num_decode_tokens` in all), a
        prefilling one its next chunk."""
        room = self._prefill_room(num_decode_tokens)
        plan = []
        for run in live:
            is_decoding, target, num_cached = run.is_decoding, len(run.seq.token_ids) - 1, run.slot.num_cached
            if not is_decoding:                                                 # prefill, in chunks
                if room <= 0:
                    continue
                ids = run.seq.token_ids[num_cached:min(target, num_cached + room)]
                room -= len(ids)
                if num_cached + len(ids) == target:
                    run.seq.stats.prefill_s = time.perf_counter() - run.admitted_at
            else:
                ids = run.seq.token_ids[-1:]                                    # the pending token
            plan.append((run, ids, is_decoding))
        return plan

    def _prefill_room(self, num_decode_tokens: int) -> int:
        """Prompt tokens this pass may take: a whole chunk when nobody is decoding; beside decoding
        streams, what max_num_batched_tokens leaves after their tokens (at least a quarter of it, so
        prompts advance)."""
        if num_decode_tokens == 0:
            return self.prefill_chunk_tokens
        budget = self.max_num_batched_tokens
        return min(self.prefill_chunk_tokens, max(budget - num_decode_tokens, budget // 4, 1))

    def _leave(self, run: Running, emit) -> None:
        del self.running[run.seq.request_id]
        self._free_slots.append(FreeSlot(run.slot, run.draft_slot, run.seq.token_ids[:run.slot.num_cached]))
        if self.drafter is not None:
            self.drafter.finish(run.seq)
        run.seq.stats.total_s = time.perf_counter() - run.admitted_at
        emit(RequestDone(run.seq.request_id, run.seq.finish_reason, run.seq.stats))


def _count_pass(stats, batch_size: int) -> None:
    counts = stats.num_passes_by_batch_size
    counts.extend([0] * (batch_size - len(counts)))
    counts[batch_size - 1] += 1
