"""Structured outputs: the token mask of a request's grammar (llguidance), for any context.

    GrammarFactory(tokenizer_dir, vocab_size)    one per worker: the tokenizer converted once,
                                                 compiled grammars cached by spec (small LRU)
    factory(spec, stop_ids) -> GrammarProcessor  one per request and side
    processor(logits[N, V], output_ids, proposal) -> logits[N, V], disallowed tokens at -inf

Row i of the logits scores the token after `output_ids + proposal[:i]`: a verify step scores its
pending token and K proposed tokens at once (N = K + 1), a draft step usually one row.

Why llguidance: the mask costs tens of microseconds per row, the wheel has no dependencies
(xgrammar would pull ~1 GB of triton into a CPU install), and vLLM, SGLang and llama.cpp use it.
Masks are filled with llguidance.numpy's helpers and unpacked with numpy, then copied to the logits'
device once; llguidance.torch's apply is torch.compile'd (a C++ toolchain on CPU, ~2 s to import).

Sync by common prefix. A processor keeps ONE llguidance matcher and the list of tokens it has
consumed. Each call brings it to the new context by rolling back to the longest common prefix and
consuming the rest, then walks the proposal row by row (mask, consume, mask, ...), and leaves the
proposal consumed: the next verify step usually extends it (accepted tokens + the bonus token),
so only the new tokens cost anything. Every way speculation goes back is just a shorter or
different context on the next call, with no rollback protocol between the decoder and the grammar:

    verify rejects proposal[j:]          next output_ids share only proposal[:j]  -> rollback
    draft reconciles after a rejection   its context is cut back to the committed text -> rollback
    a rollback fails (or the matcher is in an error state): replay the common prefix on a fresh
    copy of the compiled grammar (`num_replays` counts these).

A rollback inside a constrained region therefore restores exactly the grammar state of the
shorter context, and the masks are a function of the context alone, never of the call history.

Rejected proposal tokens. When the grammar rejects proposal[j], row j is still exact (its context
is valid) and masks proposal[j] out, so the verify never commits it; rows after j belong to a
context that never happens and only allow the stop ids. The matcher is never left in an error
state (tokens are tried, not forced).

End of text. llguidance marks "the grammar may end here" by allowing its EOS token; that bit is
mapped to all of the request's `stop_ids` (eos ids + stop_token_ids). When the grammar is
complete, only stop ids are allowed. A row is never all -inf: if the grammar allows nothing in the
model's vocabulary, the stop ids are allowed. Rows past the tokenizer (padded vocabularies) are
always masked.

Why the draft uses the same mask. The verify's choice is made from masked logits, so the output
is exactly the constrained distribution in every mode (ar / sync / async, greedy, coupled,
rejection). The draft masks with the same grammar so that its tokens are ones the verify can
accept: unmasked, a draft would keep proposing tokens the grammar forbids (each one a sure
rejection), and for rejection sampling q must be the draft's actual (masked) distribution.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import llguidance.hf
import numpy as np
import torch
from llguidance import LLMatcher
from llguidance.numpy import fill_next_token_bitmask, get_bitmask_shape

from engine.grammar_spec import grammar_from_spec, raise_if_invalid
from engine.messages import GrammarSpec

NUM_CACHED_GRAMMARS = 32


class GrammarFactory:
    """Compiles GrammarSpecs for one model: `factory(spec, stop_ids)` -> a fresh GrammarProcessor."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, num_cached: int = NUM_CACHED_GRAMMARS):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model scores only {vocab_size}")
        self.vocab_size = vocab_size                 # logits rows; ids past the tokenizer never match
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.num_cached = num_cached
        self.compiled: OrderedDict[GrammarSpec, LLMatcher] = OrderedDict()   # least recently used first

    def __call__(self, spec: GrammarSpec, stop_ids: frozenset[int]) -> GrammarProcessor:
        return GrammarProcessor(self.compile(spec), self.ll_tokenizer.eos_tokens, stop_ids, self.vocab_size)

    def compile(self, spec: GrammarSpec) -> LLMatcher:
        """The compiled grammar of `spec` in its initial state (shared: copy before use). ValueError if invalid."""
        matcher = self.compiled.pop(spec, None)
        if matcher is None:
            matcher = LLMatcher(self.ll_tokenizer, grammar_from_spec(spec))
            raise_if_invalid(spec, matcher.get_error())
        self.compiled[spec] = matcher
        while len(self.compiled) > self.num_cached:
            self.compiled.popitem(last=False)
        return matcher


class GrammarProcessor:
    """One request's grammar masks on one side (draft or verify), synced to each call's context."""

    def __init__(self, compiled: LLMatcher, grammar_eos_ids: Sequence[int], stop_ids: frozenset[int],
                 vocab_size: int):
        self.compiled = compiled                     # initial state, shared with the factory's cache
        self.matcher = compiled.deep_copy()
        self.consumed: list[int] = []                # context tokens the matcher holds (all accepted)
        self.vocab_size = vocab_size
        self.grammar_eos_ids = sorted(grammar_eos_ids)
        # allowed where the grammar may end; without stop ids (ignore_eos), the tokenizer's EOS
        self.end_ids = sorted(t for t in stop_ids if 0 <= t < vocab_size) or self.grammar_eos_ids
        self.num_replays = 0

    def __call__(self, logits: torch.Tensor, output_ids: Sequence[int], proposal: Sequence[int]) -> torch.Tensor:
        """logits[N, V] -> logits[N, V] with row i masked for the context output_ids + proposal[:i]."""
        num_rows = logits.shape[0]
        if len(proposal) < num_rows - 1:
            raise ValueError(f"{num_rows} rows need at least {num_rows - 1} proposal tokens, got {len(proposal)}")
        bitmask = np.zeros(get_bitmask_shape(num_rows, self.vocab_size), dtype=np.int32)   # [N, W]; 0 = none
        is_valid = self._sync(output_ids)
        for i in range(num_rows):
            if not is_valid:
                break                                # rows of an impossible context: stop ids only
            fill_next_token_bitmask(self.matcher, bitmask, i)
            if self.matcher.is_error():              # a parser limit was hit: end the text here
                bitmask[i] = 0
                break
            if i < num_rows - 1:
                is_valid = self._consume(proposal[i])
        return logits.masked_fill(self._disallowed(bitmask, logits.shape[1], logits.device), float("-inf"))

    def _sync(self, context: Sequence[int]) -> bool:
        """Bring the matcher to `context`; False when the grammar rejects one of its tokens."""
        num_common = 0
        for held, wanted in zip(self.consumed, context):
            if held != wanted:
                break
            num_common += 1
        num_back = len(self.consumed) - num_common
        if num_back:
            if self.matcher.is_error() or not self.matcher.rollback(num_back) or self.matcher.is_error():
                self._replay(context[:num_common])
            else:
                del self.consumed[num_common:]
        return all(self._consume(token) for token in context[num_common:])

    def _replay(self, tokens: Sequence[int]) -> None:
        """Start over from a fresh copy of the compiled grammar and consume `tokens` (all valid before)."""
        self.num_replays += 1
        self.matcher, self.consumed = self.compiled.deep_copy(), []
        for token in tokens:
            self._consume(token)

    def _consume(self, token: int) -> bool:
        """Advance by one token if the grammar accepts it. (A stop id ends the text: what the
        grammar makes of it, and of the rows after it, is never committed.)"""
        if self.matcher.try_consume_tokens([token]) != 1:
            return False
        self.consumed.append(token)
        return True

    def _disallowed(self, bitmask: np.ndarray, num_columns: int, device: torch.device) -> torch.Tensor:
        """bitmask[N, W] (bit j of word w: token 32w + j) -> disallowed[N, num_columns] bool on `device`.

        Unpacked and post-processed on the CPU (numpy: microseconds for 150k columns), then one copy.
        """
        num_rows, num_known = bitmask.shape[0], min(num_columns, self.vocab_size)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")     # [N, 32W] (little-endian words)
        allowed = np.zeros((num_rows, num_columns), dtype=bool)                      # [N, V]
        allowed[:, :num_known] = bits[:, :num_known]                 # padded columns stay masked
        grammar_eos = [t for t in self.grammar_eos_ids if t < num_columns]
        end = [t for t in self.end_ids if t < num_columns]
        can_end = allowed[:, grammar_eos].any(axis=1, keepdims=True)                  # [N, 1]
        allowed[:, grammar_eos] = False
        allowed[:, end] |= can_end
        allowed[:, end] |= ~allowed.any(axis=1, keepdims=True)       # never an all -inf row
        return torch.from_numpy(~allowed).to(device)
