"""Prompt-lookup n-gram proposals: cheap guesses of the next tokens from the sequence itself.

The draft worker checks these guesses with the draft model in one forward (a multi-token forward
costs about as much as a one-token forward on a memory-bound device), so when the text repeats
itself — identifiers in code, quoted context — the draft produces several tokens per forward.
The draft model still decides every token, so its output (and hence acceptance) is unchanged.
"""
from __future__ import annotations

import numpy as np


def propose_from_ngrams(tokens: np.ndarray, max_ngram: int, num_proposals: int, min_ngram: int = 1) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest matching suffix.

    tokens: int64 [L]. Tries suffix lengths max_ngram..min_ngram; returns up to `num_proposals`
    ids (empty when nothing matches).
    """
    length = len(tokens)
    if num_proposals <= 0 or length < 2:
        return []
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n:]
        # windows[i] = tokens[i:i+n] for every start i whose window ends before the suffix starts... or overlaps it
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n
            return tokens[start:start + num_proposals].tolist()
    return []


class LookupBudget:
    """How many n-gram guesses to append, adapted to how often guesses were accepted so far.

    Guesses lengthen the forward (cheap but not free: ~5 ms per extra token for the 1.5B model on
    one core), so once they prove useless for a request (prose rather than code) only a single
    probe guess is kept; when they start hitting again, the full budget comes back.
    """

    def __init__(self, min_hit_rate: float = 0.15, num_warmup: int = 16):
        self.min_hit_rate = min_hit_rate
        self.num_warmup = num_warmup
        self.num_proposed = 0
        self.num_accepted = 0

    def num_guesses(self, max_guesses: int) -> int:
        if max_guesses <= 0:
            return 0
        if self.num_proposed < self.num_warmup or self.num_accepted >= self.min_hit_rate * self.num_proposed:
            return max_guesses
        return 1

    def record(self, num_proposed: int, num_accepted: int) -> None:
        # exponential forgetting keeps the rate recent: halve both counts every 64 proposals
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted
        if self.num_proposed > 64:
            self.num_proposed //= 2
            self.num_accepted //= 2
