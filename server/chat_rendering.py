"""Chat request -> prompt text, through the tokenizer's (or the request's) Jinja chat template.

Turns OpenAI messages into what HF chat templates (Qwen2.5's among them) expect, as vLLM does:
  - content parts: the text parts joined with "\\n"; any other part type is a 400;
  - "developer" is rendered as "system";
  - assistant `tool_calls`: `arguments` (JSON text in OpenAI's API) parsed to an object, so that
    the template writes it back as JSON (Qwen: `<tool_call>{"name": .., "arguments": ..}</tool_call>`);
  - `tool` messages keep `tool_call_id` (Qwen renders them as `<tool_response>` in a user turn).
Options: `chat_template` (only when the server trusts request templates: a template is code the
server runs), `chat_template_kwargs` (extra template variables, e.g. enable_thinking), and
`continue_final_message` (the last, assistant, message is left open so that the model continues it;
no generation prompt follows).
"""
from __future__ import annotations

import inspect
import json
from typing import Any

from server import protocol as P
from server.errors import OpenAIError


class ChatRenderer:
    def __init__(self, tokenizer: Any, is_request_template_trusted: bool) -> None:
        self.tokenizer = tokenizer
        self.is_request_template_trusted = is_request_template_trusted
        # chat_template_kwargs may add template variables, not override apply_chat_template's arguments
        self._reserved_kwargs = set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}

    def render(self, req: P.ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> str:
        """The prompt text (with special-token text, to be encoded without adding more)."""
        if not req.messages:
            raise OpenAIError("messages must not be empty", param="messages")
        messages = [self._message(i, m) for i, m in enumerate(req.messages)]
        is_continuing = bool(req.continue_final_message)
        add_generation_prompt = req.add_generation_prompt is not False
        if is_continuing:
            if req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
                raise OpenAIError("continue_final_message and add_generation_prompt cannot both be true",
                                  param="continue_final_message")
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
                raise OpenAIError("continue_final_message needs a last message from the assistant with "
                                  "content to continue", param="continue_final_message")
            add_generation_prompt = False
        if req.chat_template is not None and not self.is_request_template_trusted:
            raise OpenAIError("this server does not accept request chat templates (start it with "
                              "--trust-request-chat-template)", param="chat_template")
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = sorted(self._reserved_kwargs & set(kwargs))
        if reserved:
            raise OpenAIError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=req.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=is_continuing, **kwargs)
        except Exception as exc:   # jinja errors (raise_exception in templates), missing template
            param = "chat_template" if req.chat_template is not None else "messages"
            raise OpenAIError(f"cannot apply the chat template: {exc}", param=param) from None

    def _message(self, i: int, m: P.ChatMessage) -> dict[str, Any]:
        if m.role not in P.ROLES:
            raise OpenAIError(f"messages[{i}].role: unknown role {m.role!r} (expected one of "
                              f"{', '.join(P.ROLES)})", param=f"messages.{i}.role")
        for key in ("refusal", "annotations", "audio", "function_call"):   # echoed by the SDK as null
            if getattr(m, key) is not None:
                raise OpenAIError(f"messages[{i}].{key} is not supported", param=f"messages.{i}.{key}")
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": _content_text(i, m.content)}
        if m.tool_calls:
            if m.role != "assistant":
                raise OpenAIError(f"messages[{i}]: only assistant messages have tool_calls",
                                  param=f"messages.{i}.tool_calls")
            message["tool_calls"] = [_tool_call(i, j, call) for j, call in enumerate(m.tool_calls)]
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        return message


def _content_text(i: int, content: str | list[P.TextContentPart] | None) -> str:
    """A message's content as one string; text parts are joined with "\\n" (as vLLM joins them)."""
    if not isinstance(content, list):
        return content or ""
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise OpenAIError(f"messages[{i}].content[{j}]: only text parts are supported (got {part.type!r})",
                              param=f"messages.{i}.content.{j}")
    return "\n".join(part.text for part in content)


def _tool_call(i: int, j: int, call: P.ToolCallParam) -> dict[str, Any]:
    """An OpenAI history call for the template: `arguments` as an object, not JSON text."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise OpenAIError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {exc}",
                              param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
    rendered: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    if call.id is not None:
        rendered["id"] = call.id
    return rendered
