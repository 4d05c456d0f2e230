"""Prompt-lookup proposals (pure numpy)."""
import numpy as np

from engine.ngram import propose_from_ngrams


def test_longest_suffix_most_recent_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # suffix (2, 3) last occurred at 5..6, followed by 7, 8, 5
    assert propose_from_ngrams(tokens, max_ngram=2, num_proposals=3) == [7, 8, 5]
    # a 3-gram (5, 2, 3) never occurred before: falls back to the 2-gram
    assert propose_from_ngrams(tokens, max_ngram=3, num_proposals=2) == [7, 8]


def test_no_match_and_limits():
    assert propose_from_ngrams(np.array([1, 2, 3, 4]), 3, 4) == []
    assert propose_from_ngrams(np.array([5]), 3, 4) == []
    assert propose_from_ngrams(np.array([1, 2, 1, 2]), 2, 0) == []
    # proposals stop at the end of the sequence
    assert propose_from_ngrams(np.array([4, 4, 4]), 1, 5) == [4]


def test_lookup_budget_backs_off_and_recovers():
    from engine.ngram import LookupBudget
    budget = LookupBudget(min_hit_rate=0.2, num_warmup=8)
    assert budget.num_guesses(5) == 5                 # warm-up: full budget
    budget.record(20, 0)                              # useless guesses
    assert budget.num_guesses(5) == 1                 # back off to a single probe
    budget.record(10, 10)                             # hits again (30 proposed, 10 accepted -> 33 %)
    assert budget.num_guesses(5) == 5
    assert budget.num_guesses(0) == 0
