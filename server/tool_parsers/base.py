"""What every tool-call parser provides (vLLM's layout: one ToolParser subclass per model family).

A parser instance lives for one request. It reads the model's output text, whole or as stream
deltas, and splits it into content (text for the user) and tool calls (OpenAI `tool_calls`, whose
`arguments` is a JSON string). While a call may still be forming, its text is held back, so that
a client never sees half of a `<tool_call>` as content. Both entry points run the same state
machine, so streaming and non-streaming give the same calls and the same content.

A family also knows how to force its own call format: `tool_call_grammar` returns an llguidance
Lark grammar (tool_choice "required" or a named function) that the engine applies as a token mask.
"""
from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


def make_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str                      # JSON text, as OpenAI sends it
    id: str = field(default_factory=make_tool_call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The OpenAI object; with `index` it is a stream delta (`delta.tool_calls[i]`)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


class ToolParser(ABC):
    name: ClassVar[str]                 # the `tool_call_parser` setting that selects this class

    def __init__(self, is_parallel: bool = True) -> None:
        self.is_parallel = is_parallel          # False (parallel_tool_calls=false): calls after the first are dropped
        self.tool_calls: list[ToolCall] = []    # every call kept so far, in output order

    # ---- what a family implements ------------------------------------------------------------
    @abstractmethod
    def extract_tool_calls_streaming(self, delta_text: str) -> tuple[str, list[ToolCall]]:
        """Feed the next piece of output: (content safe to emit now, calls completed by it)."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output ended: (held-back content, calls) that the last deltas left open."""

    @classmethod
    @abstractmethod
    def tool_call_grammar(cls, functions: list[dict[str, Any]], allow_multiple: bool,
                          special_tokens: frozenset[str] = frozenset()) -> str:
        """A Lark grammar whose sentences are calls, in this family's format, of the given
        OpenAI function definitions ({"name", "parameters"}): one call, or one or more.

        special_tokens: the tokenizer's added tokens. A tag that is one of them (Qwen2.5's
        `<tool_call>` is token 151657) must be referenced as that token (`<tool_call>` in Lark):
        the text literal "<tool_call>" only matches the tag spelled out in ordinary tokens,
        which is not what the model was trained to emit."""

    # ---- shared ------------------------------------------------------------------------------
    def _add_call(self, name: str, arguments: str) -> list[ToolCall]:
        """Record a call a subclass found: [the call], or [] when only one is allowed and it is
        a second one. A call's stream index is its position in `tool_calls`."""
        if self.tool_calls and not self.is_parallel:
            return []
        self.tool_calls.append(ToolCall(name, arguments))
        return self.tool_calls[-1:]

    def extract_tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole output at once: (content, calls). Content is None when calls took it all."""
        content, calls = self.extract_tool_calls_streaming(text)
        rest, more_calls = self.finish()
        content, calls = content + rest, calls + more_calls
        return (content or None) if calls else content, calls

    def stream_delta(self, delta_text: str, is_last: bool) -> dict[str, Any]:
        """The `delta` of a chat stream chunk for this piece of output ({} when all is held back)."""
        content, calls = self.extract_tool_calls_streaming(delta_text)
        if is_last:
            rest, more_calls = self.finish()
            content, calls = content + rest, calls + more_calls
        first_index = len(self.tool_calls) - len(calls)
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [c.to_openai(first_index + i) for i, c in enumerate(calls)]
        return delta

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI reports "tool_calls" when the answer is calls (a cut-off answer stays "length")."""
        return "tool_calls" if self.tool_calls and engine_reason != "length" else engine_reason
