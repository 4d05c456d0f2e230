"""The draft's output layer over part of the vocabulary (`draft_vocab_size`): fewer bytes per draft token.

    head = SubsetHead(float_weight, 32768, "int8-fast", torch.float32)   # built once, at load
    head.score_prompt(key, prompt_ids)      # a running request's prompt ids are scored too ...
    head.forget_prompt(key)                 # ... until it leaves
    logits = head(hidden)                   # hidden [n, H] -> logits [n, V], -inf for ids not scored

Scored: ids < num_ids, in one matmul of the draft's own quantization (built from the float output
matrix: the tied input embedding, or the head as loaded, kept in bf16 by load_causal_lm), plus the
running requests' prompt ids above num_ids (identifiers, rare words: what a draft copies most), in
float. Every other id gets -inf, so the draft never proposes it. The verify still scores the whole
vocabulary and decides every token, so output is unchanged; a token the draft cannot propose only
ends that draft (it costs acceptance, not correctness).

Why it might pay: the default draft's output layer (151936 x 896) is ~27 % of the bytes it reads
per token (int8), and byte-level BPE vocabularies put the most frequent merges first: ids >= 32768
and not in the prompt are 2.1 % of HumanEval's canonical solution tokens (Qwen2.5 tokenizer). What
was measured (AVX512_BF16 EPYC, `sync`, 8 chat prompts, one process alternating): a 32768-id head
made a draft forward 27.4 -> 23.7 ms but cost acceptance 0.68 -> 0.61 (62.9 vs 63.4 ms/token);
65536 ids 0.78 -> 0.77 (61.4 vs 60.1 ms/token). No clear gain on chat, so it is off by default.
"""
from __future__ import annotations

import torch
from torch import nn


class SubsetHead:
    """logits = head(hidden) over ids < num_ids and the running prompts' ids; -inf for the rest."""

    def __init__(self, float_weight: torch.Tensor, num_ids: int, quantization: str, dtype: torch.dtype):
        """float_weight [V, H]: the full output matrix in float (kept by reference for prompt ids);
        dtype: the model's activations."""
        from engine.quantization import make_quantized
        self.vocab_size, hidden_size = float_weight.shape
        self.num_ids, self.dtype = num_ids, dtype
        self.float_weight = float_weight
        prefix = nn.Linear(hidden_size, num_ids, bias=False, device=float_weight.device, dtype=dtype)
        with torch.no_grad():
            prefix.weight.copy_(float_weight[:num_ids])
        self.prefix_head = (make_quantized(prefix, quantization) if quantization != "none" else None) or prefix
        self._prompt_ids: dict[object, set[int]] = {}
        self._extra_ids: torch.Tensor | None = None         # [E] sorted ids >= num_ids of running prompts
        self._extra_weight: torch.Tensor | None = None      # [E, H]

    def score_prompt(self, key, prompt_ids) -> None:
        self._prompt_ids[key] = {i for i in prompt_ids if self.num_ids <= i < self.vocab_size}
        self._update_extra()

    def forget_prompt(self, key) -> None:
        if self._prompt_ids.pop(key, None):
            self._update_extra()

    def _update_extra(self) -> None:
        ids = sorted(set().union(*self._prompt_ids.values()))
        if not ids:
            self._extra_ids = self._extra_weight = None
            return
        self._extra_ids = torch.tensor(ids, dtype=torch.long, device=self.float_weight.device)
        self._extra_weight = self.float_weight.index_select(0, self._extra_ids).to(self.dtype)

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> logits [n, V]: ids < num_ids and the prompts' ids scored, -inf elsewhere."""
        prefix = self.prefix_head(hidden)                                          # [n, num_ids]
        logits = prefix.new_full((hidden.shape[0], self.vocab_size), float("-inf"))
        logits[:, :self.num_ids] = prefix
        if self._extra_ids is not None:
            extra = nn.functional.linear(hidden, self._extra_weight)                  # [n, E]
            logits.index_copy_(1, self._extra_ids, extra.to(logits.dtype))
        return logits
