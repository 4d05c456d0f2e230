"""Context-dependent logits processing: grammar mask, min_tokens, logit_bias and the penalties.

Applied to the raw logits before temperature / top-k / top-p / min-p (engine/sampling.py), by the
verify AND by the draft (engine/token_chooser.py), position by position:

    logits[N, V]      row i scores the token that follows  context_i = output_ids + proposal[:i]
    processor(logits, output_ids, proposal) -> logits'[N, V]

output_ids: the tokens generated so far (after the prompt); proposal: the tokens the later rows
assume (draft tokens and n-gram guesses on the verify, n-gram guesses on the draft; only
proposal[:N-1] is read). Row i equals, bit for bit, what the same processor gives for that position
alone, processor(logits[i:i+1], output_ids + proposal[:i], []): every operation is elementwise in
float32 (float64 for float64 logits) and per-row token counts are exact integers. So a k-token
verify scores each position exactly as `ar` does, and coupled sampling keeps seeded identity.

Order (as vLLM v1): grammar mask, min_tokens, logit_bias, then the repetition, frequency and
presence penalties. Token ids >= V (a bias or stop id past a smaller draft vocabulary) are ignored.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.messages import GrammarSpec, SamplingParams


class LogitsProcessor(Protocol):
    def __call__(self, logits: Tensor, output_ids: Sequence[int], proposal: Sequence[int]) -> Tensor: ...


MakeGrammar = Callable[[GrammarSpec, list[int]], LogitsProcessor]


def stop_token_ids(params: SamplingParams, eos_token_ids: Sequence[int]) -> frozenset[int]:
    """Ids that end the sequence: params.stop_token_ids, plus the model's EOS ids unless ignore_eos."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


def build_logits_processors(params: SamplingParams, prompt_ids: Sequence[int], stop_ids: Sequence[int],
                            make_grammar: MakeGrammar | None = None) -> list[LogitsProcessor]:
    """The processors a request asks for, in the order they apply (empty: nothing to do)."""
    processors: list[LogitsProcessor] = []
    if params.grammar is not None:
        if make_grammar is None:
            raise ValueError("a request with a grammar reached a worker without a grammar factory")
        processors.append(make_grammar(params.grammar, sorted(stop_ids)))
    if params.min_tokens and stop_ids:
        processors.append(MinTokens(params.min_tokens, stop_ids))
    if params.logit_bias:
        processors.append(LogitBias(params.logit_bias))
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        processors.append(Penalties(params.presence_penalty, params.frequency_penalty,
                                    params.repetition_penalty, prompt_ids))
    return processors


def apply_logits_processors(processors: Sequence[LogitsProcessor], logits: Tensor, output_ids: Sequence[int],
                            proposal: Sequence[int] = ()) -> Tensor:
    """logits[N, V] -> processed scores[N, V] (float32, or float64 if given float64); logits if none apply."""
    if not processors:
        return logits
    if len(proposal) < logits.shape[0] - 1:
        raise ValueError(f"{logits.shape[0]} rows need a proposal of {logits.shape[0] - 1} tokens, got {len(proposal)}")
    scores = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    for processor in processors:
        scores = processor(scores, output_ids, proposal)
    return scores


def token_counts(output_ids: Sequence[int], proposal: Sequence[int], num_rows: int, columns: Tensor) -> Tensor:
    """counts[N, S] (int64): counts[i, j] = occurrences of token columns[j] in output_ids + proposal[:i].

    columns: sorted distinct token ids [S]; ids that are not among them are not counted.
    """
    device = columns.device
    output = _as_ids(output_ids, device)
    base = torch.isin(output, columns)                                                # [n_output]
    base = torch.searchsorted(columns, output[base]).bincount(minlength=len(columns))   # [S]
    steps = torch.zeros(num_rows, len(columns), dtype=torch.int64, device=device)      # [N, S]
    if num_rows > 1:
        added = _as_ids(proposal[: num_rows - 1], device)                             # [N-1]
        is_counted = torch.isin(added, columns)
        rows = torch.arange(1, num_rows, device=device)[is_counted]
        steps[rows, torch.searchsorted(columns, added[is_counted])] = 1               # row i+1 adds proposal[i]
    return base + torch.cumsum(steps, dim=0)


def _as_ids(token_ids: Sequence[int], device: torch.device) -> Tensor:
    """list / numpy / tensor of ids -> LongTensor[n] on device (a copy: shared buffers stay untouched)."""
    if isinstance(token_ids, Tensor):
        return token_ids.to(device=device, dtype=torch.long).view(-1)
    return torch.tensor(np.asarray(token_ids, dtype=np.int64).reshape(-1), device=device)


class MinTokens:
    """Stop ids get -inf while fewer than min_tokens tokens were generated (so nothing stops early).

    A row whose only finite entries are stop ids (e.g. a grammar that is complete) keeps them: the
    request then stops before min_tokens rather than sampling from nothing.
    """

    def __init__(self, min_tokens: int, stop_ids: Sequence[int]):
        self.min_tokens = min_tokens
        self.stop_ids = sorted(stop_ids)

    def __call__(self, logits: Tensor, output_ids: Sequence[int], proposal: Sequence[int]) -> Tensor:
        num_rows, vocab_size = logits.shape
        num_masked_rows = min(max(self.min_tokens - len(output_ids), 0), num_rows)   # row i: len(context) = len(output) + i
        ids = [t for t in self.stop_ids if t < vocab_size]
        if num_masked_rows == 0 or not ids:
            return logits
        masked = logits.clone()
        masked[:num_masked_rows, ids] = -torch.inf                                   # [N, V]
        is_empty = torch.isneginf(masked).all(dim=-1, keepdim=True)                  # [N, 1]
        return torch.where(is_empty, logits, masked)


class LogitBias:
    """OpenAI logit_bias: bias[t] added to token t's logit (ids past the vocabulary ignored)."""

    def __init__(self, logit_bias: dict[int, float]):
        self.logit_bias = dict(logit_bias)
        self._rows: dict[tuple, Tensor] = {}       # (V, device, dtype) -> bias row [V]

    def __call__(self, logits: Tensor, output_ids: Sequence[int], proposal: Sequence[int]) -> Tensor:
        return logits + self._row(logits)

    def _row(self, logits: Tensor) -> Tensor:
        vocab_size = logits.shape[-1]
        key = (vocab_size, logits.device, logits.dtype)
        if key not in self._rows:
            row = torch.zeros(vocab_size, dtype=logits.dtype, device=logits.device)
            for token_id, bias in self.logit_bias.items():
                if token_id < vocab_size:
                    row[token_id] = bias
            self._rows[key] = row
        return self._rows[key]


class Penalties:
    """Repetition (HF / vLLM: tokens of prompt + output; positive logits / r, negative * r), then
    frequency (-= f * count in the output) and presence (-= p if in the output) penalties (OpenAI).

    Only the columns of tokens that occur (prompt, output, proposal) can change: they are gathered
    [N, S], penalised with exact per-row counts and written back; every other logit stays as it is.
    """

    def __init__(self, presence_penalty: float, frequency_penalty: float, repetition_penalty: float,
                 prompt_ids: Sequence[int]):
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.repetition_penalty = repetition_penalty
        self.prompt_ids = sorted(set(prompt_ids)) if repetition_penalty != 1.0 else []   # only repetition reads the prompt
        self._prompt_id_tensors: dict[torch.device, Tensor] = {}

    def __call__(self, logits: Tensor, output_ids: Sequence[int], proposal: Sequence[int]) -> Tensor:
        num_rows, vocab_size = logits.shape
        device = logits.device
        prompt, output = self._prompt_ids_on(device), _as_ids(output_ids, device)
        proposal = _as_ids(proposal[: num_rows - 1], device)
        seen = torch.cat([prompt, output, proposal])
        columns = torch.unique(seen[seen < vocab_size])                                  # [S], sorted
        if columns.numel() == 0:
            return logits
        counts = token_counts(output, proposal, num_rows, columns)                        # [N, S]
        is_in_output = counts > 0                                                         # [N, S]
        scores = logits[:, columns]                                                       # [N, S]
        if self.repetition_penalty != 1.0:
            is_seen = is_in_output | torch.isin(columns, prompt)                          # [N, S]
            penalized = torch.where(scores > 0, scores / self.repetition_penalty, scores * self.repetition_penalty)
            scores = torch.where(is_seen, penalized, scores)
        if self.frequency_penalty:
            scores = scores - self.frequency_penalty * counts.to(scores.dtype)
        if self.presence_penalty:
            scores = scores - self.presence_penalty * is_in_output.to(scores.dtype)
        return logits.index_copy(1, columns, scores)

    def _prompt_ids_on(self, device: torch.device) -> Tensor:
        if device not in self._prompt_id_tensors:
            self._prompt_id_tensors[device] = torch.tensor(self.prompt_ids, dtype=torch.long, device=device)
        return self._prompt_id_tensors[device]


class LazyGrammarFactory:
    """A worker's make_grammar: builds engine.grammar.GrammarFactory(tokenizer_dir, vocab_size) the
    first time a request has a grammar, so workers that never see one never load llguidance."""

    def __init__(self, tokenizer_dir: str, vocab_size: int):
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.factory = None

    def __call__(self, spec: GrammarSpec, stop_ids: list[int]) -> LogitsProcessor:
        if self.factory is None:
            from engine.grammar import GrammarFactory
            self.factory = GrammarFactory(self.tokenizer_dir, self.vocab_size)
        return self.factory(spec, stop_ids)
