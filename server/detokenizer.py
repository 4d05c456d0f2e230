"""Incremental, UTF-8-safe detokenisation with stop strings that never leak into the stream.

Tokens arrive a few at a time. Text is decoded over a small sliding window of token ids (the
prefix/read offsets of TGI and vLLM) so that a multi-byte character split across tokens is only
emitted once complete (a trailing U+FFFD means "wait for more bytes"). Text that could still turn
into a stop string (a suffix equal to a stop string's prefix) is held back until it either cannot
or the request ends; when a stop string appears, the text is cut before it (after it with
include_stop_str).

    d = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\n"])
    for token_ids in outputs:
        text, n_used = d.add(token_ids)     # n_used < len(token_ids) once a stop string hit
        if d.stopped: break
    text += d.flush()                       # at the end: whatever was held back
"""
from __future__ import annotations

from typing import Any, Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5   # prompt tokens decoded with the output, for tokenizers that merge spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop_str: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._include_stop = include_stop_str
        self._stops = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stops), default=0)
        ctx = list(prompt_ids[-_PROMPT_CONTEXT:])
        while ctx and _REPLACEMENT in self._decode(ctx):
            ctx = ctx[1:]     # context must decode cleanly, else offsets would be off
        self._ids: list[int] = ctx
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self.text = ""              # output text decoded so far (cut at a stop string)
        self._emitted = 0           # chars of self.text already returned
        self._checked = 0           # chars of self.text already searched for stop strings
        self.num_tokens = 0         # output tokens consumed
        self.stopped = False
        self.stop_reason: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip) if ids else ""

    def _next_text(self, final: bool = False) -> str:
        """Text newly completed by the ids appended since the last read offset."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(_REPLACEMENT)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix):]
        return ""

    def _find_stop(self) -> None:
        if not self._stops:
            return
        start = max(0, self._checked - self._max_stop + 1)
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, start)) >= 0]
        self._checked = len(self.text)
        if hits:
            idx, s = min(hits)
            self.text = self.text[:idx + (len(s) if self._include_stop else 0)]
            self.stopped, self.stop_reason = True, s

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self.text
        for k in range(min(self._max_stop - 1, len(text) - self._emitted), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def _take(self, final: bool) -> str:
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._holdback()
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted:end]
        self._emitted = end
        return out

    def add(self, token_ids: Sequence[int]) -> tuple[str, int]:
        """Feed new tokens; return (text safe to emit now, how many of token_ids were used)."""
        used = 0
        for tid in token_ids:
            if self.stopped:
                break
            self._ids.append(int(tid))
            self.num_tokens += 1
            used += 1
            delta = self._next_text()
            if delta:
                self.text += delta
                self._find_stop()
        return self._take(final=False), used

    def flush(self) -> str:
        """At the end of generation: decode any incomplete tail and release held-back text."""
        if not self.stopped and self._read_offset < len(self._ids):
            delta = self._next_text(final=True)
            if delta:
                self.text += delta
                self._find_stop()
        return self._take(final=True)
