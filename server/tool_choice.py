"""What a chat request's `tools` and `tool_choice` do, decided before the prompt is rendered.

    tool_choice             tools in the prompt   output parsed for calls   output constrained to
    "none"                  no (hidden)           no                        -
    "auto" (default)        yes                   yes                       -
    "required"              yes                   yes                       one or more calls (any tool)
    {"type": "function",    yes                   yes                       one call of that function
     "function": {"name"}}

The constraint is a Lark grammar in the parser family's own call format (GrammarSpec kind "lark"),
which the engine applies as a token mask; `parallel_tool_calls: false` allows a single call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.grammar_spec import validate_grammar_spec
from engine.messages import GrammarSpec
from server import protocol as P
from server.errors import OpenAIError
from server.tool_parsers import ToolParser


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]] | None       # what the chat template renders (None: no tools)
    grammar: GrammarSpec | None              # the output constraint, if tool_choice forces calls
    parser_cls: type[ToolParser] | None      # None: the output is plain content
    is_parallel: bool = True

    def new_parser(self) -> ToolParser | None:
        """A fresh parser for one response (parsers keep per-request state)."""
        return self.parser_cls(self.is_parallel) if self.parser_cls is not None else None


def plan_tools(req: P.ChatCompletionRequest, parser_cls: type[ToolParser],
               special_tokens: frozenset[str] = frozenset()) -> ToolPlan:
    """special_tokens: the tokenizer's added tokens (tags among them are forced as those tokens)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if not tools:
        if choice not in ("none", "auto"):
            raise OpenAIError("tool_choice requires tools", param="tool_choice")
        return ToolPlan(None, None, None)
    names = [t["function"]["name"] for t in tools]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise OpenAIError(f"two tools are named {duplicate!r}", param="tools")
    if choice == "none":
        return ToolPlan(None, None, None)
    is_parallel = req.parallel_tool_calls is not False
    if choice == "auto":
        return ToolPlan(tools, None, parser_cls, is_parallel)
    if choice == "required":
        functions = [t["function"] for t in tools]
    else:
        wanted = choice.function.name
        functions = [t["function"] for t in tools if t["function"]["name"] == wanted]
        if not functions:
            raise OpenAIError(f"tool_choice names the function {wanted!r}, which is not among the tools",
                              param="tool_choice")
    grammar = parser_cls.tool_call_grammar(functions, allow_multiple=choice == "required" and is_parallel,
                                           special_tokens=special_tokens)
    spec = GrammarSpec(kind="lark", value=grammar)
    try:
        validate_grammar_spec(spec)
    except ValueError as exc:
        raise OpenAIError(f"the tools' parameters schemas cannot be enforced: {exc}", param="tools") from None
    return ToolPlan(tools, spec, parser_cls, is_parallel)
