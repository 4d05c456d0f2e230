"""Model loading and the per-worker `ModelRunner` (a causal LM plus its KV cache).

Model specs a config may name:
    default:verify / default:draft    the default pair, fetched once by `amusd fetch-models`
    tiny-random/<name>               tiny random-weight Qwen2 models built here in seconds (tests, demos)
    /path/to/dir                     a Hugging Face model directory
    /path/to/model.gguf              a GGUF file (transformers' `gguf_file`; needs `gguf` + `accelerate`)
    org/name                         a hub id (only where a network exists)

Runs inside the worker processes (imports torch).
"""
from __future__ import annotations

import os

import torch

from engine.config import ConfigError
from engine.tiny_models import TINY_PREFIX, ensure_tiny_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def resolve_model_spec(spec: str, cache_dir: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return (local dir or hub id, gguf file name or None) for a model spec."""
    if spec.startswith("default:"):
        from engine.fetch import ensure_default_models
        verify_dir, draft_dir = ensure_default_models(cache_dir)
        role = spec.split(":", 1)[1]
        if role not in ("verify", "draft"):
            raise ConfigError(f"unknown default model {spec!r}: use default:verify or default:draft")
        return (verify_dir if role == "verify" else draft_dir), None
    if spec.startswith(TINY_PREFIX):
        return ensure_tiny_model(spec, cache_dir), None
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ConfigError(f"GGUF file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.sep in spec and not os.path.exists(spec) and spec.startswith((".", "/", "~")):
        raise ConfigError(f"model directory not found: {spec}")
    return os.path.expanduser(spec), gguf_file


def load_causal_lm(path: str, gguf_file: str | None, device: str, dtype: str):
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": DTYPES[dtype]}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def eos_token_ids_of(model) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = model.config.eos_token_id
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def check_same_vocab(verify_model, draft_model, verify_dir: str, draft_dir: str) -> None:
    """Refuse a pair that cannot share token ids."""
    verify_vocab = verify_model.get_output_embeddings().weight.shape[0]
    draft_vocab = draft_model.get_output_embeddings().weight.shape[0]
    if verify_vocab != draft_vocab:
        raise ConfigError(f"draft and verify vocabularies differ: draft {draft_dir} has {draft_vocab} "
                          f"output rows, verify {verify_dir} has {verify_vocab}; they must share a tokenizer")
    from transformers import AutoTokenizer
    try:
        verify_tok = AutoTokenizer.from_pretrained(verify_dir)
        draft_tok = AutoTokenizer.from_pretrained(draft_dir)
    except (OSError, ValueError):
        return  # e.g. a GGUF-only dir: the embedding size check above is all we can do
    if verify_tok.get_vocab() != draft_tok.get_vocab():
        raise ConfigError(f"draft tokenizer ({draft_dir}) differs from verify tokenizer ({verify_dir})")


class ModelRunner:
    """One causal LM with a DynamicCache holding KV for a prefix of one sequence.

    Invariant kept by callers: the cache holds every token of the sequence except the
    last one, which is the next forward's first input ("pending token").
    """

    def __init__(self, model, device: str):
        from transformers import DynamicCache
        self.model = model
        self.device = torch.device(device)
        self._cache_cls = DynamicCache
        self.cache = DynamicCache(config=model.config)
        self.lm_head = model.get_output_embeddings()
        self.vocab_size = self.lm_head.weight.shape[0]
        self.head_ids: torch.Tensor | None = None      # restricted output vocabulary (draft only)
        self.head_weight: torch.Tensor | None = None

    def restrict_vocab(self, token_ids) -> None:
        """Compute logits only for `token_ids` (others get -inf); None restores the full head.

        A draft-only speed-up: the output layer is ~20 % of a 0.5B model's forward on one CPU core.
        The verify model still scores the full vocabulary, so output is unchanged.
        """
        if token_ids is None or len(token_ids) >= self.vocab_size:
            self.head_ids = self.head_weight = None
            return
        self.head_ids = torch.as_tensor(sorted(set(token_ids)), dtype=torch.long, device=self.device)
        self.head_weight = self.lm_head.weight.index_select(0, self.head_ids).contiguous()

    def reset(self) -> None:
        self.cache = self._cache_cls(config=self.model.config)

    @property
    def num_cached(self) -> int:
        return int(self.cache.get_seq_length())

    def crop(self, num_tokens: int) -> None:
        """Keep KV for the first `num_tokens` positions only."""
        num_remove = self.num_cached - num_tokens
        if num_remove > 0:
            self.cache.crop(-num_remove)

    @torch.inference_mode()
    def forward(self, token_ids, last_only: bool = False) -> torch.Tensor:
        """Append `token_ids` (list or 1-D tensor) to the cache; return logits [n, V] (or [1, V])."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).view(1, -1)
        hidden = self.model.model(input_ids=ids, past_key_values=self.cache, use_cache=True).last_hidden_state
        if last_only:
            hidden = hidden[:, -1:]
        if self.head_ids is None:
            return self.lm_head(hidden)[0]
        sub_logits = torch.nn.functional.linear(hidden[0], self.head_weight)          # [n, len(head_ids)]
        logits = sub_logits.new_full((sub_logits.shape[0], self.vocab_size), float("-inf"))
        return logits.index_copy_(1, self.head_ids, sub_logits)

    @torch.inference_mode()
    def prefill(self, token_ids: list[int]) -> None:
        """Fill the cache with all but the last token (the pending one)."""
        self.reset()
        if len(token_ids) > 1:
            ids = torch.as_tensor(token_ids[:-1], dtype=torch.long, device=self.device).view(1, -1)
            self.model.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
