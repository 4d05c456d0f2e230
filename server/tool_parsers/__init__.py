"""Tool-call parsers by model family, chosen by the `tool_call_parser` setting (as in vLLM).

To add a family: subclass ToolParser (base.py) in its own module and list it in TOOL_PARSERS.
"""
from __future__ import annotations

from server.tool_parsers.base import ToolCall, ToolParser
from server.tool_parsers.hermes import HermesToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,     # Qwen2.5 (instruct, coder), Hermes 2/3
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; ValueError naming the known ones otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool_call_parser {name!r} (known: {', '.join(sorted(TOOL_PARSERS))})") from None


__all__ = ["TOOL_PARSERS", "ToolCall", "ToolParser", "get_tool_parser"]
