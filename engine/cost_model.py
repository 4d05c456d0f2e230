"""A measured cost model of speculation: how many tokens to check per verify, and which mode.

Pure Python (no torch): the workers feed it their measured forward costs, the supervisor uses it
to pick `mode: auto`. The maths, with a = per-token acceptance (a proposed token is accepted
given all before it were), assumed the same at every position:

    E(n)   = 1 + a + ... + a^n = (1 - a^(n+1)) / (1 - a)     committed tokens when n are proposed
    c_v(k) = verify forward over k tokens (measured, k = 1..K; linear beyond K)
    c_d    = one draft forward of one token

    async verify budget   n* = argmax_n  E(n) / c_v(n + 1)                  (n <= proposals on hand)
    sync draft length     k* = argmax_k  E(k) / (k c_d + c_v(k + 1))
    predicted tokens / s  ar     1 / c_v(1)
                          sync   E(k*) / (k* c_d + c_v(k* + 1))
                          async  max_n  (r E(n) + (1 - r)) / (r max(c_v(n + 1), n c_d) + (1 - r) c_v(1))

Async: the draft runs on its own device, so a step that checks drafts lasts as long as the slower
of the two. But after a step that rejects a draft (probability 1 - a^n) the draft starts again
from the verify's correction, which it learns only when that step ends: the next step, which
starts at once, has nothing to check (it commits 1 token in c_v(1)), and the one after it has
drafts again. So a fraction r = 1 / (2 - a^n) of steps check drafts (the stationary share of
that two-state chain). Measured on the default pair (one chat stream, a = 0.74, n = 1): 1.51
tokens per step; E(1) alone says 1.74, this model 1.59.

`a` is learnt online (`AcceptanceEstimator`, the maximum-likelihood rate under the geometric model,
with a prior and exponential forgetting). Where the CPU cannot run k tokens for the price of one
(no native bf16, dense weights) c_v grows ~linearly in k and n* falls to 0 or 1 by itself.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ACCEPTANCE_PRIOR = 0.7
MIN_GUARDED_S = 0.01     # measurements of forwards faster than this are not checked for load (timer jitter)


@dataclass(frozen=True)
class ForwardCosts:
    """Seconds for one forward appending k tokens to a short KV cache; seconds[k - 1], k = 1..K."""
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seconds or any(s <= 0 for s in self.seconds):
            raise ValueError(f"forward costs must be positive, got {self.seconds}")

    @property
    def max_tokens(self) -> int:
        return len(self.seconds)

    def cost(self, num_tokens: int) -> float:
        """c(k); past the measured range, extended linearly with the last measured slope."""
        if num_tokens <= self.max_tokens:
            return self.seconds[max(1, num_tokens) - 1]
        slope = self.seconds[-1] - self.seconds[-2] if self.max_tokens > 1 else self.seconds[-1]
        return self.seconds[-1] + max(slope, 0.0) * (num_tokens - self.max_tokens)


def async_step_mix(num_proposed: int, acceptance: float) -> float:
    """r: the share of async verify steps that find drafts to check (the others follow a rejection)."""
    return 1.0 / (2.0 - acceptance ** num_proposed) if num_proposed > 0 else 1.0


def expected_committed(num_proposed: int, acceptance: float) -> float:
    """E(n): expected tokens one verify step commits when n tokens are proposed."""
    if acceptance >= 1.0:
        return float(num_proposed + 1)
    return (1.0 - acceptance ** (num_proposed + 1)) / (1.0 - acceptance)


def best_verify_budget(verify: ForwardCosts, acceptance: float, max_proposed: int) -> int:
    """n* in 0..max_proposed maximising committed tokens per second of verify time."""
    return max(range(max_proposed + 1), key=lambda n: (expected_committed(n, acceptance) / verify.cost(n + 1), -n))


def best_sync_length(verify: ForwardCosts, draft: ForwardCosts, acceptance: float, max_draft: int) -> int:
    """k* in 1..max_draft for classic speculation (draft then verify on one device)."""
    return max(range(1, max_draft + 1),
               key=lambda k: (expected_committed(k, acceptance) / (k * draft.cost(1) + verify.cost(k + 1)), -k))


def predict_tokens_per_s(mode: str, verify: ForwardCosts, draft: ForwardCosts | None, acceptance: float,
                         max_proposed: int) -> float:
    """Predicted decode speed of a mode (prefill and protocol overheads left out)."""
    if mode == "ar" or draft is None:
        return 1.0 / verify.cost(1)
    if mode == "sync":
        k = best_sync_length(verify, draft, acceptance, max_proposed)
        return expected_committed(k, acceptance) / (k * draft.cost(1) + verify.cost(k + 1))
    return max(async_tokens_per_s(n, acceptance, max(verify.cost(n + 1), n * draft.cost(1)), verify.cost(1))
               for n in range(max_proposed + 1))


def async_tokens_per_s(num_proposed: int, acceptance: float, checking_s: float, bare_s: float) -> float:
    """Async speed when a step checking num_proposed drafts lasts checking_s and a step with none
    (after a rejection) bare_s (module docstring)."""
    r = async_step_mix(num_proposed, acceptance)
    return (r * expected_committed(num_proposed, acceptance) + 1.0 - r) / (r * checking_s + (1.0 - r) * bare_s)


def prefer_wide_pass(narrow: ForwardCosts, wide: ForwardCosts, draft: ForwardCosts,
                     proposals: list[tuple[int, float]]) -> bool:
    """Async batching: is the next verify pass faster on both workers' cores, the draft paused and
    every row checking its pending token only, than beside the draft checking its proposals?

    proposals: (n_i tokens row i would check, its acceptance a_i), i = 1..B.
        beside the draft   sum_i (r_i E(n_i, a_i) + 1 - r_i) tokens (r_i: the share of steps in which
                           row i has drafts, async_step_mix) in max(narrow c(B + sum r_i n_i),
                           max n_i * draft c(B))
        wide               B tokens in wide c(B)
    One sequence's c(k) stands in for a pass of k rows (the same weights read, the same rows multiplied).
    """
    num_rows = len(proposals)
    mixes = [async_step_mix(n, a) for n, a in proposals]
    num_tokens = round(sum(r * n for r, (n, _) in zip(mixes, proposals)))
    beside = max(narrow.cost(num_rows + num_tokens), max(n for n, _ in proposals) * draft.cost(num_rows))
    committed = sum(r * expected_committed(n, a) + 1.0 - r for r, (n, a) in zip(mixes, proposals))
    return num_rows / wide.cost(num_rows) > committed / beside


def best_sync_batch_sizes(verify: ForwardCosts, draft: ForwardCosts, proposals: list[tuple[int, float]]) -> list[int]:
    """Sync batching: the draft lengths k_i of a pass over B sequences, from proposals (k_i, a_i):
    the most tokens per second among the sizes met when, for each number of draft rounds R, the k_i
    are capped at R, then cut one token at a time, the least likely accepted first (row i's last
    token is accepted with probability a_i^k_i). Predicted:
        committed   sum_i E(k_i, a_i)
        seconds     c_v(B + sum_i k_i) + sum_{r=1..R} c_d(#{i: k_i >= r})   (draft round r: the rows
                    still drafting; catching a draft slot up after a pause is left out)
    All zeros is `ar`'s pass: B tokens in c_v(B), the draft idle. One sequence's c(k) stands in for
    a pass of k rows. On a compute-bound CPU a full batch so drafts nothing: one more row in the
    verify pass buys little, a draft round over one row costs a whole draft forward.
    """
    def tokens_per_s(sizes: list[int]) -> float:
        rounds = sum(draft.cost(sum(k >= r for k in sizes)) for r in range(1, max(sizes, default=0) + 1))
        committed = sum(expected_committed(k, a) for k, (_, a) in zip(sizes, proposals))
        return committed / (verify.cost(len(sizes) + sum(sizes)) + rounds)

    def cut_paths():
        for num_rounds in range(max(sizes, default=0), -1, -1):
            capped = [min(k, num_rounds) for k in sizes]
            yield list(capped)
            while any(capped):
                last_odds = [a ** k if k > 0 else 2.0 for k, (_, a) in zip(capped, proposals)]
                capped[last_odds.index(min(last_odds))] -= 1
                yield list(capped)

    sizes = [k for k, _ in proposals]
    return max(cut_paths(), key=tokens_per_s)        # the first best: the proposals themselves on a tie


@dataclass(frozen=True)
class ModeCosts:
    """Forward costs as each mode meets them (`mode: auto`, engine/mode_auto.py).

    verify, draft                  each alone on its own cores (every worker's start-up measurement)
    verify_together, draft_together  each while the other runs: async's two workers share the
                                   machine's memory system (on one CPU socket a second core adds
                                   ~1.2x bandwidth, not 2x), so each runs slower than alone
    verify_wide, draft_wide        alone on the cores of both workers: ar and sync run in one worker there
    A missing measurement falls back to the alone one. is_disturbed: something else ran while they
    were measured (engine/mode_auto.py): use them now, keep nothing decided from them.
    """
    verify: ForwardCosts
    draft: ForwardCosts | None = None
    verify_together: ForwardCosts | None = None
    draft_together: ForwardCosts | None = None
    verify_wide: ForwardCosts | None = None
    draft_wide: ForwardCosts | None = None
    is_disturbed: bool = False

    def for_mode(self, mode: str) -> tuple[ForwardCosts, ForwardCosts | None]:
        """(verify, draft) costs that `mode` runs at."""
        if mode == "async":
            return self.verify_together or self.verify, self.draft_together or self.draft
        return self.verify_wide or self.verify, (self.draft_wide or self.draft) if mode == "sync" else None


@dataclass(frozen=True)
class ModePlan:
    mode: str
    tokens_per_s: dict[str, float]
    reason: str


def choose_mode(costs: ModeCosts, acceptance: float, max_proposed: int) -> ModePlan:
    """`mode: auto`: the mode with the highest predicted speed, and why."""
    modes = ("ar",) if costs.draft is None else ("ar", "sync", "async")
    speeds = {mode: predict_tokens_per_s(mode, *costs.for_mode(mode), acceptance, max_proposed) for mode in modes}
    best = max(speeds, key=speeds.get)
    shown = ", ".join(f"{mode} {speed:.1f} tok/s" for mode, speed in speeds.items())
    used = {mode: costs.for_mode(mode) for mode in modes}
    measured = "; ".join(f"{mode}: verify c(1) {v.cost(1) * 1e3:.1f} ms"
                         + (f", draft {d.cost(1) * 1e3:.1f} ms" if d else "") for mode, (v, d) in used.items())
    reason = f"predicted from measured forward costs ({measured}) at acceptance {acceptance:.2f}: {shown}"
    return ModePlan(best, speeds, reason)


class AcceptanceEstimator:
    """Online per-token acceptance a: accepted / (accepted + rejections), prior-weighted, forgetting.

    A step that proposed n and accepted m < n saw m acceptances and one rejection; m == n saw n
    acceptances and no rejection (the maximum-likelihood estimate of a geometric acceptance).
    """

    def __init__(self, prior: float = DEFAULT_ACCEPTANCE_PRIOR, prior_weight: float = 8.0, decay: float = 0.98):
        self.prior_accepted, self.prior_rejected = prior * prior_weight, (1.0 - prior) * prior_weight
        self.num_accepted, self.num_rejected = self.prior_accepted, self.prior_rejected
        self.decay = decay

    def record(self, num_proposed: int, num_accepted: int) -> None:
        if num_proposed <= 0:
            return
        self.num_accepted = self.num_accepted * self.decay + num_accepted
        self.num_rejected = self.num_rejected * self.decay + (num_accepted < num_proposed)

    def fade(self) -> None:
        """A step that checked no drafts: the evidence fades toward the prior, at the rate old
        evidence fades anyway, so a stream that stopped checking drafts because its estimate fell
        (async batching's wide passes) tries them again later instead of never."""
        self.num_accepted = self.num_accepted * self.decay + (1.0 - self.decay) * self.prior_accepted
        self.num_rejected = self.num_rejected * self.decay + (1.0 - self.decay) * self.prior_rejected

    @property
    def rate(self) -> float:
        total = self.num_accepted + self.num_rejected
        return min(0.99, self.num_accepted / total) if total > 0 else DEFAULT_ACCEPTANCE_PRIOR


class SpeculationBudget:
    """How many proposed tokens the next verify step should check (a fixed setting wins).

    The worker keeps one with its measured curves; every request gets its own (`for_request`,
    kept on its Sequence), whose acceptance estimate starts from the prior, so a request's proposal
    sizes depend on that request alone, batched or not (in `sync` a seeded request is then
    reproducible, rejection sampling included).
    """

    def __init__(self, verify: ForwardCosts | None, max_tokens: int, num_fixed: int = 0,
                 draft: ForwardCosts | None = None, acceptance_prior: float = DEFAULT_ACCEPTANCE_PRIOR):
        self.verify, self.draft = verify, draft
        self.max_tokens, self.num_fixed = max_tokens, num_fixed
        self.acceptance_prior = acceptance_prior
        self.acceptance = AcceptanceEstimator(acceptance_prior)

    def for_request(self) -> "SpeculationBudget":
        """A budget for one request: these cost curves and settings, acceptance from the prior."""
        return SpeculationBudget(self.verify, self.max_tokens, self.num_fixed, self.draft, self.acceptance_prior)

    def price_with(self, verify: ForwardCosts) -> None:
        """Choose proposal sizes by this verify curve from now on (async batched: the verify's cost
        beside the running draft, which the wide-pass rule compares with too)."""
        self.verify = verify

    def num_to_check(self) -> int:
        """Async verify: proposals (draft tokens + n-gram guesses) worth checking in one forward.

        At least one: the draft's tokens cost the verify only c(2) - c(1), and without a probe the
        acceptance estimate could never recover once it says "check nothing".
        """
        if self.num_fixed or self.verify is None:
            return self.num_fixed or self.max_tokens
        return max(1, best_verify_budget(self.verify, self.acceptance.rate, self.max_tokens))

    def num_to_draft(self) -> int:
        """Sync: draft tokens per round (at least 1)."""
        if self.num_fixed or self.verify is None or self.draft is None:
            return self.num_fixed or 4
        return best_sync_length(self.verify, self.draft, self.acceptance.rate, self.max_tokens)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.acceptance.record(num_proposed, num_accepted)

    def record_nothing_checked(self) -> None:
        """A pass that checked no drafts (an async-batch wide pass): the estimate fades toward the prior."""
        self.acceptance.fade()
