"""Token selection that keeps speculative decoding lossless (pure torch, no processes).

Scores. `process_logits` turns raw logits z into log-space scores
    s = filter(z / T),  filter = top-k -> top-p -> min-p (filtered entries = -inf),
so softmax(s) is the distribution the request asks for. Draft and verify both call it.

Coupled sampling (default). Output position i (0 = first generated token) owns a Gumbel
vector g_i = G(seed, i) in R^V, g_ij = -log(-log(u_ij)), u_ij = hash(seed, i, j) in (0, 1).
Gumbel-max trick: argmax_j(s_j + g_ij) is an exact sample from softmax(s). Both models use
the same g_i, so the draft proposes x_i = argmax(s^draft + g_i), the verifier computes
y_i = argmax(s^target + g_i), accepts x_i iff x_i == y_i, and the committed tokens equal a
non-speculative run with the same seed token for token. u_ij is a splitmix64 counter hash
in int64 torch ops: it depends only on (seed, i, j) -- not on the process, device, torch
version, batch grouping or vocab size (a smaller vocab's noise is a prefix of a larger one).

Rejection sampling (Leviathan et al. 2023, Chen et al. 2023). Draft x_k ~ q_k, k < K.
Accept x_k with probability min(1, p_k(x_k) / q_k(x_k)), in order; at the first rejection
emit a sample of norm(max(0, p_k - q_k)); if all K are accepted emit a bonus ~ p_K.
Every emitted token is then distributed exactly as p (the target).
"""
from __future__ import annotations

import dataclasses
import random

import torch
from torch import Tensor

from engine.messages import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15   # splitmix64 increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


# ---- scores ----------------------------------------------------------------------

def process_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits[..., V] -> log-space scores[..., V] (float32, or float64 if given float64).

    Order (as vLLM): temperature, then top-k, then top-p and min-p on the renormalised rest.
    top-k keeps exactly k entries; top-p keeps the smallest most-likely prefix with mass >= p;
    min-p keeps entries with prob >= min_p * max prob. Not for greedy (temperature 0).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = logits.to(dtype)                                        # [..., V]
    if params.temperature > 0:
        scores = scores / params.temperature
    vocab_size = scores.shape[-1]
    if 0 < params.top_k < vocab_size:
        top = torch.topk(scores, params.top_k, dim=-1)               # [..., k]
        scores = torch.full_like(scores, -torch.inf).scatter(-1, top.indices, top.values)
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs   # exclusive cumsum
        is_removed_sorted = mass_before >= params.top_p               # first entry always kept
        is_removed = torch.empty_like(is_removed_sorted).scatter(-1, order, is_removed_sorted)
        scores = scores.masked_fill(is_removed, -torch.inf)
    if params.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        max_probs = probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < params.min_p * max_probs, -torch.inf)
    return scores


def probs_from_scores(scores: Tensor) -> Tensor:
    """scores[..., V] (from process_logits) -> probabilities[..., V]; filtered entries get 0."""
    return torch.softmax(scores, dim=-1)


# ---- coupled (Gumbel-max) sampling -------------------------------------------------

def _splitmix64(x: int) -> int:
    """splitmix64 finaliser on a Python int (reference for the tensor version)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _as_int64(x: int) -> int:
    """Unsigned 64-bit -> the two's-complement value torch.int64 stores."""
    return x - (1 << 64) if x >= (1 << 63) else x


def _shift_right_logical(x: Tensor, bits: int) -> Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)   # int64 >> is arithmetic; drop sign bits


def _splitmix64_tensor(x: Tensor) -> Tensor:
    """Same as _splitmix64 on an int64 tensor (multiplication wraps mod 2^64)."""
    x = (x ^ _shift_right_logical(x, 30)) * _as_int64(_MIX1)
    x = (x ^ _shift_right_logical(x, 27)) * _as_int64(_MIX2)
    return x ^ _shift_right_logical(x, 31)


def position_key(seed: int, position: int) -> int:
    """64-bit key of output position `position` of a request with `seed`."""
    return _splitmix64(_splitmix64(seed) + position)


def coupled_noise(seed: int, start_position: int, num_positions: int, vocab_size: int,
                  device: torch.device | str = "cpu") -> Tensor:
    """Gumbel noise[num_positions, V] (float32) for positions start_position, start_position+1, ...

    Row r is coupled_gumbel(seed, start_position + r, V), bit for bit. u_ij = (m + 1/2) / 2^52
    with m the top 52 bits of splitmix64(key_i + (j + 1) * golden), so 0 < u < 1.
    CPU (the default) is the reference; on another device log() may differ in the last ulp.
    """
    keys = torch.tensor([_as_int64(position_key(seed, start_position + r)) for r in range(num_positions)],
                        dtype=torch.int64, device=device)                        # [N]
    steps = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device) * _as_int64(_GOLDEN)  # [V]
    bits = _splitmix64_tensor(keys[:, None] + steps[None, :])                    # [N, V]
    uniforms = (_shift_right_logical(bits, 12).to(torch.float64) + 0.5) * 2.0 ** -52
    return (-torch.log(-torch.log(uniforms))).to(torch.float32)


def coupled_gumbel(seed: int, position: int, vocab_size: int) -> Tensor:
    """Gumbel noise[V] (float32, CPU) of one output position; identical in every process."""
    return coupled_noise(seed, position, 1, vocab_size)[0]


class CoupledNoiseCache:
    """Per-request memo of coupled noise rows (position -> Tensor[V] on `device`).

    The verifier re-scores positions it already scored last step (bonus position, rollbacks),
    the draft redrafts after rollbacks: each row is computed once, on `device` (a CUDA worker
    makes its noise on its GPU: no host work, no pageable copy per token). Rows are pure functions
    of (seed, position, device), so the cache can only save time, never change a token; draft and
    verify on different device kinds may differ in the last ulp, which can only cost acceptance. Keeps the
    `max_positions` highest positions seen (output positions only grow, old ones are dead).
    """

    def __init__(self, seed: int, vocab_size: int, device: torch.device | str = "cpu",
                 max_positions: int = 64):
        self.seed = seed
        self.vocab_size = vocab_size
        self.device = device
        self.max_positions = max_positions
        self.rows: dict[int, Tensor] = {}

    def noise(self, start_position: int, num_positions: int, vocab_size: int | None = None) -> Tensor:
        """noise[num_positions, vocab_size] on self.device, equal to coupled_noise(seed, start_position, ...).

        vocab_size (default: the cache's) may be smaller than the cache's: a smaller vocabulary's
        noise is a prefix of a larger one's (a draft scoring fewer rows than a padded verify).
        """
        vocab_size = vocab_size or self.vocab_size
        if vocab_size > self.vocab_size:
            raise ValueError(f"noise for {vocab_size} tokens from a cache of {self.vocab_size}")
        positions = range(start_position, start_position + num_positions)
        missing = [p for p in positions if p not in self.rows]
        if missing:
            first, last = missing[0], missing[-1]
            fresh = coupled_noise(self.seed, first, last - first + 1, self.vocab_size, self.device)
            for offset, row in enumerate(fresh):
                self.rows.setdefault(first + offset, row)
        for old in sorted(self.rows)[:-self.max_positions]:
            if old < start_position:
                del self.rows[old]
        return torch.stack([self.rows[p][:vocab_size] for p in positions])


def coupled_choice(scores: Tensor, seed: int, start_position: int,
                   noise_cache: CoupledNoiseCache | None = None) -> Tensor:
    """Gumbel-max: scores[N, V] (from process_logits) -> token ids LongTensor[N].

    Row r is an exact sample from softmax(scores[r]) using the noise of position start_position + r.
    """
    num_positions, vocab_size = scores.shape
    if noise_cache is not None:
        noise = noise_cache.noise(start_position, num_positions, vocab_size)
    else:
        noise = coupled_noise(seed, start_position, num_positions, vocab_size)
    return torch.argmax(scores + noise.to(scores.device, scores.dtype), dim=-1)


def choose_tokens(logits: Tensor, params: SamplingParams, start_position: int,
                  noise_cache: CoupledNoiseCache | None = None) -> Tensor:
    """logits[N, V] of output positions start_position.. -> LongTensor[N]. Draft and verify call this.

    temperature == 0: argmax. Otherwise coupled Gumbel-max with params.seed, which must be set:
    a request without a seed gets a random one ONCE, before it reaches the workers
    (`with_request_seed`), so that draft and verify share it. Raises ValueError if it is None.
    """
    if params.is_greedy:
        return torch.argmax(logits, dim=-1)
    if params.seed is None:
        raise ValueError("choose_tokens needs params.seed; call with_request_seed() per request first")
    return coupled_choice(process_logits(logits, params), params.seed, start_position, noise_cache)


def with_request_seed(params: SamplingParams, rng: random.Random | None = None) -> SamplingParams:
    """params itself if it has a seed, else a copy with a fresh random seed in [0, 2^63)."""
    if params.seed is not None:
        return params
    return dataclasses.replace(params, seed=(rng or random.SystemRandom()).randrange(2**63))


# ---- rejection sampling ------------------------------------------------------------

def sample_from_probs(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of probs[..., V] (weights, need not sum to 1) -> LongTensor[...].

    Inverse CDF with uniforms drawn on generator.device, so a CPU generator works for GPU probs.
    Zero-probability tokens are never chosen.
    """
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)                         # [..., V]
    uniforms = torch.rand(probs.shape[:-1], generator=generator, device=generator.device,
                          dtype=torch.float64).to(probs.device)                # [...]
    targets = (uniforms * cdf[..., -1]).unsqueeze(-1)                           # [..., 1]
    token_ids = torch.searchsorted(cdf, targets, right=True).squeeze(-1)        # first cdf > target
    return token_ids.clamp(max=probs.shape[-1] - 1)


def rejection_verify(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
                     generator: torch.Generator) -> tuple[int, int]:
    """Speculative sampling step -> (num_accepted, next_token).

    draft_tokens[K] with draft_probs[K, V] = q (what they were sampled from), target_probs[K+1, V] = p
    (row k: target distribution of the token after the first k drafts). Commit
    draft_tokens[:num_accepted] followed by next_token.
    """
    num_draft = draft_tokens.shape[0]
    rows = torch.arange(num_draft, device=draft_tokens.device)
    p_of_draft = target_probs[rows, draft_tokens].to(torch.float64)             # [K]
    q_of_draft = draft_probs[rows, draft_tokens].to(torch.float64)              # [K]
    uniforms = torch.rand(num_draft, generator=generator, device=generator.device,
                          dtype=torch.float64).to(p_of_draft.device)            # [K]
    is_accepted = uniforms * q_of_draft < p_of_draft                             # u < p/q
    num_accepted = int(torch.cumprod(is_accepted.to(torch.int64), dim=0).sum())
    if num_accepted == num_draft:
        return num_accepted, int(sample_from_probs(target_probs[num_draft], generator))
    p = target_probs[num_accepted].to(torch.float64)                             # [V]
    residual = (p - draft_probs[num_accepted].to(torch.float64)).clamp(min=0)    # max(0, p - q)
    residual = torch.where(residual.sum() > 0, residual, p)                      # p == q: fall back to p
    return num_accepted, int(sample_from_probs(residual, generator))


# ---- logprobs ----------------------------------------------------------------------

def top_logprobs(logits: Tensor, token_ids: Tensor, num_top: int) -> list[TokenLogprob]:
    """Model logprobs (log_softmax of raw logits[N, V], no sampling filters) of token_ids[N],
    each with the num_top most likely alternatives (best first)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)                        # [N, V]
    chosen = logprobs.gather(-1, token_ids.to(logprobs.device).view(-1, 1)).squeeze(-1).tolist()
    if num_top > 0:
        top = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
    else:
        top_ids = top_values = [[] for _ in chosen]
    return [TokenLogprob(token_id=int(t), logprob=float(lp), top=list(zip(ids, values)))
            for t, lp, ids, values in zip(token_ids.tolist(), chosen, top_ids, top_values)]
