"""Tiny messages that cross process boundaries (pure Python, picklable, no torch).

    frontend --GenerationRequest--> supervisor --StartRequest--> workers
    verify worker --TokensOut/RequestDone/WorkerFailed--> supervisor --EngineOutput--> frontend

Engine outputs carry their own stats (`RequestStats`) so that only the frontend owns
Prometheus: the engine never touches metrics.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields


@dataclass
class SamplingParams:
    """Per-request decoding settings. temperature == 0 means greedy."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0           # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    num_logprobs: int | None = None   # None = no logprobs; N >= 0 = sampled token + top-N
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)   # extra end-of-sequence ids
    # Context-dependent logits processing, applied before temperature/top-k/top-p/min-p, on the
    # verify side position by position (and on the draft side the same way, for acceptance):
    presence_penalty: float = 0.0     # OpenAI: -= p for every token seen in the output so far
    frequency_penalty: float = 0.0    # OpenAI: -= f * count in the output so far
    repetition_penalty: float = 1.0   # CTRL/HF: logits of tokens in prompt + output divided (>0) or multiplied (<0) by r
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    min_tokens: int = 0               # stop ids are masked until this many tokens were generated
    grammar: GrammarSpec | None = None   # structured output: the token mask of a grammar (engine/grammar.py)
    num_prompt_logprobs: int | None = None   # echo + logprobs: logprobs of the prompt tokens, top-N

    def validate(self) -> None:
        """Raise ValueError (message names the field) for out-of-range values."""
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "must be a finite number >= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0 (0 = off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "must be an integer in [0, 2^63)"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list) and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "must be a list of token ids"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "must be a finite number > 0"),
            ("logit_bias", isinstance(self.logit_bias, dict) and all(isinstance(t, int) and t >= 0 and _finite(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()), "must map token ids to numbers in [-100, 100]"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "must be an integer in [0, max_tokens]"),
            ("num_prompt_logprobs", self.num_prompt_logprobs is None or (isinstance(self.num_prompt_logprobs, int) and 0 <= self.num_prompt_logprobs <= 20), "must be in [0, 20]"),
            ("num_logprobs", self.num_logprobs is None or (isinstance(self.num_logprobs, int) and 0 <= self.num_logprobs <= 20), "must be in [0, 20]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GrammarSpec:
    """A structured-output constraint, as the frontend parsed it from the request (picklable text).

    kind: "json_object" (any JSON object; value ""), "json_schema" (value: the schema as JSON text),
    "regex" (value: the pattern), "choice" (value: JSON list of strings), "lark" (value: an
    llguidance Lark grammar, which may embed JSON schemas with %json; tool calls use it).
    """
    kind: str
    value: str = ""

    KINDS = ("json_object", "json_schema", "regex", "choice", "lark")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class GenerationRequest:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


# ---- supervisor -> workers -------------------------------------------------------

@dataclass
class StartRequest:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Shutdown:
    pass


@dataclass
class CancelRequest:
    """Batching verify worker (engine/batch_decode.py): stop this request at the next step. (One request
    at a time is cancelled through shared memory instead: CANCEL_REQUEST_ID, checked before every step.)"""
    request_id: int


@dataclass
class Measure:
    """`mode: auto` (engine/mode_auto.py): time this worker's forward again, `placement`:
    "together" (while the other worker does the same; the draft repeats one-token forwards until
    MeasureStop) or "wide" (alone, on the cores ar and sync would run on). Answered by Measured."""
    placement: str


@dataclass
class MeasureStop:
    pass


@dataclass
class PassCosts:
    """Async batching (engine/async_batch.py): the verify's c(1..K) beside the running draft
    (`narrow`) and on both workers' cores (`wide`), and the draft's own c(1..K): what each pass
    decides with. Sent by the supervisor once the pair is ready (mode auto's measurements, cached)."""
    narrow: list[float]
    wide: list[float]
    draft: list[float]


# ---- workers -> supervisor -------------------------------------------------------

@dataclass
class Measured:
    role: str
    placement: str
    seconds: list[float]           # c(1..K)

@dataclass
class WorkerReady:
    role: str
    pid: int
    vocab_size: int
    eos_token_ids: list[int]
    load_seconds: float
    model_dir: str = ""                 # local directory of the model (tokenizer files live there)
    runtime: dict = field(default_factory=dict)   # dtype, quantization (and why), measured forward costs


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token_id, logprob), best first


@dataclass
class TokensOut:
    """Newly committed tokens of one verify step (1 or more)."""
    request_id: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None   # echo: one per prompt token (first: None)


@dataclass
class RequestStats:
    """What one request cost; the frontend turns these into metrics."""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_verify_steps: int = 0           # verify forwards (each commits >= 1 token)
    num_proposed_tokens: int = 0        # draft tokens + n-gram guesses checked (the speculation budget used)
    num_cached_prompt_tokens: int = 0   # prompt tokens whose KV was reused from the previous request
    num_draft_tokens: int = 0           # draft tokens sent to verification
    num_accepted_tokens: int = 0        # of those, accepted
    num_rollbacks: int = 0              # epoch bumps that discarded draft work
    num_draft_tokens_wasted: int = 0    # drafted, then discarded (rejected, or past the end)
    num_draft_tokens_produced: int = 0  # tokens the draft model produced (async: incl. unverified ones)
    num_drafts: int = 0                 # verify forwards that used at least one draft token
    num_lookup_tokens: int = 0          # async verify: n-gram guesses appended after the draft's tokens
    num_lookup_accepted: int = 0        # of those, accepted
    num_draft_forwards: int = 0         # draft-model forwards (async: < drafted tokens when n-gram guesses hit)
    sum_draft_lead: int = 0             # sum over verify steps of (drafted - committed) when read
    num_draft_tokens_per_pos: list[int] = field(default_factory=list)     # [i]: draft tokens checked at position i
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [i]: of those, accepted (vLLM's _per_pos)
    num_wide_steps: int = 0             # batching: steps the cost model ran as ar's (async: on both workers'
                                        # cores, the draft paused; sync: the draft idle)
    num_passes_by_batch_size: list[int] = field(default_factory=list)     # [B-1]: verify passes over B sequences
                                        # (a batched pass counts in one of its requests only: engine/batch_decode.py)
    verify_busy_s: float = 0.0
    draft_busy_s: float = 0.0
    prefill_s: float = 0.0
    total_s: float = 0.0

    def plus(self, other: "RequestStats") -> "RequestStats":
        """Field-wise sum (per-position lists element-wise): the stats of several choices of a request."""
        def add(a, b):
            if isinstance(a, list):
                return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]
            return a + b
        return RequestStats(**{f.name: add(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_verify(self) -> float:
        return self.num_generated_tokens / self.num_verify_steps if self.num_verify_steps else 0.0


@dataclass
class RequestDone:
    request_id: int
    finish_reason: str                  # "stop" (EOS) | "length" | "cancelled"
    stats: RequestStats


@dataclass
class WorkerFailed:
    role: str
    request_id: int | None
    error: str                          # one-line summary
    traceback: str = ""


# ---- supervisor -> frontend ------------------------------------------------------

@dataclass
class EngineOutput:
    """One item of a request's output stream.

    Exactly one item per request has `finished=True`; it carries `finish_reason`
    ("stop", "length", "cancelled", "error") and the request's `stats`.
    """
    request_id: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None   # on the first item, when asked for
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    stats: RequestStats | None = None
