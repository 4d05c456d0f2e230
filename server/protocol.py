"""OpenAI API request/response models (pydantic only, no logic beyond field-level checks).

Shapes follow OpenAI and vLLM's OpenAI server. Unknown request fields are accepted and ignored
(official clients send extras); NaN/inf are rejected. Cross-field and range checks that need the
model (context length, vocab) live in serving.py.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "developer", "user", "assistant", "tool")


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())


# ---- errors ----------------------------------------------------------------------

class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- requests --------------------------------------------------------------------

class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingRequest(OpenAIBaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None          # vLLM extension; -1 / 0 = off
    min_p: float | None = None        # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    ignore_eos: bool | None = False   # vLLM extension
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextContentPart(OpenAIBaseModel):
    # issue 12: other part types carry other keys (image_url, ...): server/chat_rendering.py names them in a 400
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


# issue 12: tools / chat template / FIM -------------------------------------------------
class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionCallParam(OpenAIBaseModel):
    name: str
    arguments: str | dict[str, Any]             # OpenAI: JSON text; a parsed object is accepted too
    parsed_arguments: Any = None                # the SDK's streaming helper echoes its parse of `arguments`


class ToolCallParam(OpenAIBaseModel):
    """A call in an assistant message of the history (as a response returned it)."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallParam
    index: int | None = None                    # the SDK's streaming helper keeps the delta index


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction
# ---------------------------------------------------------------------------------------


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallParam] | None = None   # issue 12
    # issue 12: the openai SDK sends a returned message back with these (null); non-null is a 400
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    parsed: Any = None                          # the SDK's .parse()/.stream() helpers echo their parse of content


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True   # vLLM extension
    # issue 12: tools / chat template / FIM (server/tool_choice.py, server/chat_rendering.py)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None   # None: auto with tools
    parallel_tool_calls: bool | None = None     # false: at most one call
    chat_template: str | None = None            # vLLM extension: a Jinja template for this request
    chat_template_kwargs: dict[str, Any] | None = None    # vLLM extension: extra template variables
    continue_final_message: bool | None = False  # vLLM extension: continue the last (assistant) message


# ---- responses -------------------------------------------------------------------

def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class SpecDecodeUsage(OpenAIBaseModel):
    """AMUSD extension: what speculation did for this request."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_rollbacks: int = 0
    num_draft_tokens_wasted: int = 0
    acceptance_rate: float = 0.0
    tokens_per_verify: float = 0.0


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    spec_decode: SpecDecodeUsage | None = None


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)   # issue 12: ToolCall.to_openai()


class ChatChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "amusd"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
