"""Hermes-format tool calls, as Qwen2.5 (instruct and coder) writes them:

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"zone": "CET"}}
    </tool_call>

Each closed `<tool_call>...</tool_call>` block whose body is a JSON object with a string "name"
(and an object "arguments", default {}) becomes a call; a block that does not parse stays content,
verbatim. A block still open when the output ends is parsed the same way (a call cut by max_tokens
is content). Whitespace right before a call, between calls and after the last one is dropped;
other text outside the blocks is content.
"""
from __future__ import annotations

import json
from typing import Any

from server.tool_parsers.base import ToolCall, ToolParser

# JSON inside a call is written as Qwen's chat template renders history calls (Jinja `tojson`):
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (may become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of one call's body: {"name": <this name>, "arguments": <its parameters>}."""
    params = dict(function.get("parameters") or {"type": "object"})
    defs = {key: params.pop(key) for key in ("$defs", "definitions") if key in params}   # "#/$defs/.." refs
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False, **defs, "x-guidance": _JSON_STYLE}


class HermesToolParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, is_parallel: bool = True) -> None:
        super().__init__(is_parallel)
        self._buffer = ""          # text not yet emitted nor parsed (a block body, or a possible tag start)
        self._is_in_call = False   # a <tool_call> is open; _buffer holds its body so far
        self._held_space = ""      # whitespace outside blocks: content only if more content follows
        self._space_before_call = ""   # the whitespace before the open block: dropped if it is a call

    def extract_tool_calls_streaming(self, delta_text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += delta_text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._is_in_call:
                end = self._buffer.find(self.END)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(self.END):]
                self._is_in_call = False
                self._close_block(body, is_closed=True, content=content, calls=calls)
                continue
            start = self._buffer.find(self.START)
            if start < 0:
                keep = _held_prefix_len(self._buffer, self.START)
                text, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                content.append(self._text(text))
                break
            content.append(self._text(self._buffer[:start]))
            self._space_before_call, self._held_space = self._held_space, ""
            self._buffer = self._buffer[start + len(self.START):]
            self._is_in_call = True
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._is_in_call:
            self._close_block(self._buffer, is_closed=False, content=content, calls=calls)
        else:
            content.append(self._text(self._buffer))
        self._buffer, self._is_in_call = "", False
        if not self.tool_calls:
            content.append(self._held_space)
        self._held_space = ""
        return "".join(content), calls

    def _text(self, text: str) -> str:
        """Content outside blocks, less trailing whitespace (held until more content follows)."""
        text = self._held_space + text
        kept = text.rstrip()
        self._held_space = text[len(kept):]
        return kept

    def _close_block(self, body: str, is_closed: bool, content: list[str], calls: list[ToolCall]) -> None:
        parsed = self._parse_body(body)
        if parsed is not None:
            calls += self._add_call(*parsed)
        else:
            content.append(self._text(self._space_before_call + self.START + body + (self.END if is_closed else "")))
        self._space_before_call = ""   # the whitespace before the open block: dropped if it is a call

    @staticmethod
    def _parse_body(body: str) -> tuple[str, str] | None:
        """(name, arguments as JSON text) of a block body, or None if it is not a call."""
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        arguments = obj.get("arguments", {})
        if not isinstance(arguments, dict):
            return None
        return obj["name"], json.dumps(arguments, ensure_ascii=False)

    @classmethod
    def tool_call_grammar(cls, functions: list[dict[str, Any]], allow_multiple: bool,
                          special_tokens: frozenset[str] = frozenset()) -> str:
        def tag(name: str) -> str:       # an added token by reference, else its text
            return name if name in special_tokens else json.dumps(name)
        newline = json.dumps("\n")
        lines = ["start: call" + (f" ({newline} call)*" if allow_multiple else ""),
                 f"call: {tag(cls.START)} {newline} body {newline} {tag(cls.END)}",
                 "body: " + " | ".join(f"fn_{i}" for i in range(len(functions)))]
        lines += [f"fn_{i}: %json {json.dumps(_call_schema(fn), ensure_ascii=False)}" for i, fn in enumerate(functions)]
        return "\n".join(lines) + "\n"
