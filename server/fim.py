"""Fill-in-the-middle: `suffix` on /v1/completions, in Qwen2.5-Coder's (and StarCoder-style) format

    <|fim_prefix|>{prompt}<|fim_suffix|>{suffix}<|fim_middle|>   -> the model writes the middle

The prompt is built from token ids: the three markers are the tokenizer's special tokens, and the
prompt and the suffix are tokenised like any /v1/completions prompt. Only a tokenizer that has
all three markers can do it; otherwise `suffix` gets a 400. The middle ends where the model ends a file: Qwen2.5-Coder writes <|endoftext|>
(not the chat EOS <|im_end|>), or a repository-level marker; those stop generation too (as
llama.cpp's end-of-generation set for FIM does).
"""
from __future__ import annotations

from typing import Any

from server.errors import OpenAIError

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
FIM_STOP_TOKENS = ("<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")


class FimPrompter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()          # includes added (special) tokens
        markers = [vocab.get(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)]
        self.marker_ids: tuple[int, int, int] | None = tuple(markers) if None not in markers else None
        self.stop_token_ids = [vocab[t] for t in FIM_STOP_TOKENS if t in vocab]

    @property
    def is_supported(self) -> bool:
        return self.marker_ids is not None

    def prompt_ids(self, prefix_ids: list[int], suffix: str) -> list[int]:
        """The FIM prompt around the (already tokenised) prefix; 400 naming `suffix` if unsupported."""
        if self.marker_ids is None:
            raise OpenAIError(f"suffix (fill-in-the-middle) needs a model whose tokenizer has the "
                              f"{FIM_PREFIX}, {FIM_SUFFIX} and {FIM_MIDDLE} tokens; this one does not",
                              param="suffix")
        try:
            suffix.encode("utf-8")
        except UnicodeEncodeError:
            raise OpenAIError("the suffix contains invalid Unicode (a lone surrogate)", param="suffix") from None
        prefix, suffix_marker, middle = self.marker_ids
        suffix_ids = self.tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
        return [prefix, *prefix_ids, suffix_marker, *suffix_ids, middle]
