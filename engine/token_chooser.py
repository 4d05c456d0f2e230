"""Per-request token choice for the draft and the verify side: greedy, coupled, or rejection.

    greedy      temperature 0: argmax. Accept a draft token iff it equals the verify argmax.
    coupled     Gumbel-max with noise keyed by (seed, output position) only, identical in every
                process: draft x_i and target y_i share g_i; accept iff x_i == y_i, else commit y_i.
                Committed text == what `ar` samples with that seed (token for token).
    rejection   Leviathan et al. / Chen et al.: the draft samples x ~ q and publishes q; accept with
                prob min(1, p(x)/q(x)), on rejection sample norm(max(0, p - q)), bonus from p.
                Lossless in distribution (not seed-identical to `ar`); higher acceptance than coupled.

Both sides apply the same processing, in this order: the request's context-dependent logits
processors (penalties, logit_bias, min_tokens, grammar: engine/logits_processors.py), each row with
its own context, then temperature, top-k, top-p, min-p (engine/sampling.py). Greedy is the argmax
of the processed logits; q and p are softmaxes of fully processed scores.

Rows and context: logits[N, V] row i scores output position len(output_ids) + i, the token after
output_ids + proposal[:i] (output_ids: the tokens generated so far, after the prompt).
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.logits_processors import LogitsProcessor, apply_logits_processors
from engine.messages import SamplingParams
from engine.sampling import (CoupledNoiseCache, choose_tokens, position_key, probs_from_scores, process_logits,
                             rejection_verify, sample_from_probs)

DRAFT_STREAM, VERIFY_STREAM = 1, 2


class TokenChooser:
    def __init__(self, params: SamplingParams, scheme: str, stream: int,
                 processors: Sequence[LogitsProcessor] = ()):
        self.params = params
        self.processors = list(processors)
        self.is_rejection = scheme == "rejection" and params.temperature > 0
        self.generator = None
        self.noise_cache: CoupledNoiseCache | None = None   # coupled: each position's noise computed once
        if self.is_rejection:
            # Seeded per request and per side, so a seeded rejection run is reproducible.
            self.generator = torch.Generator().manual_seed(position_key(params.seed or 0, -stream) & (2**63 - 1))

    def draft(self, logits: torch.Tensor, output_ids: Sequence[int],
              proposal: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits[N, V] (row i: after output_ids + proposal[:i]) -> (token ids [N], q [N, V] when
        rejection sampling else None)."""
        logits = apply_logits_processors(self.processors, logits, output_ids, proposal)
        if not self.is_rejection:
            return choose_tokens(logits, self.params, len(output_ids), self._noise_cache(logits)), None
        q = self._probs(logits)                                                      # [N, V]
        return sample_from_probs(q, self.generator), q

    def verify(self, logits: torch.Tensor, output_ids: Sequence[int], proposal: list[int],
               draft_probs: torch.Tensor | None = None) -> tuple[int, list[int]]:
        """logits[K+1, V] over pending + proposal[K] -> (num_accepted, committed token ids).

        output_ids: the committed output before the pending position. draft_probs[K, V]: q of each
        proposed token (rejection only; rows of a deterministic proposal such as an n-gram guess are one-hot).
        """
        logits = apply_logits_processors(self.processors, logits, output_ids, proposal)
        if not self.is_rejection:
            target = choose_tokens(logits, self.params, len(output_ids), self._noise_cache(logits)).tolist()  # [K+1]
            num_accepted = 0
            while num_accepted < len(proposal) and proposal[num_accepted] == target[num_accepted]:
                num_accepted += 1
            return num_accepted, target[: num_accepted + 1]
        p = self._probs(logits)                                                      # [K+1, V]
        if not proposal:
            return 0, [int(sample_from_probs(p[0], self.generator))]
        q = draft_probs.to(p.device, p.dtype)[: len(proposal)]                       # [K, V_draft]
        if q.shape[-1] < p.shape[-1]:       # a padded verify scores more rows: the draft never proposes them
            q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))          # [K, V]
        num_accepted, next_token = rejection_verify(torch.tensor(proposal, device=p.device), q,
                                                    p[: len(proposal) + 1], self.generator)
        return num_accepted, proposal[:num_accepted] + [next_token]

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits[N, V] -> the distribution each row samples from (float32)."""
        return probs_from_scores(process_logits(logits.float(), self.params))

    def _noise_cache(self, logits: torch.Tensor) -> CoupledNoiseCache | None:
        if self.params.temperature == 0:
            return None
        if self.noise_cache is None or self.noise_cache.vocab_size < logits.shape[-1]:
            # sync mode asks for draft rows and (possibly more, padded) verify rows through one chooser
            self.noise_cache = CoupledNoiseCache(self.params.seed, logits.shape[-1], logits.device)
        return self.noise_cache
