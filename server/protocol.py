"""OpenAI API request/response models (pydantic only, no logic beyond field-level checks).

Shapes follow OpenAI, vLLM's OpenAI server and llama-server's aliases. Request models are strict:
an unknown field is a 400 naming it, except the fields of IGNORED_FIELDS, the one list of fields
that are accepted and dropped because they cannot change the output (and unknown fields sent as
null, which means "not set"). NaN/inf are rejected.
Cross-field and range checks that need the model (context length, vocab, grammars) live in
server/request_params.py and server/structured_outputs.py.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool")


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())


# Accepted and dropped: request fields that cannot change the output (tests check every one).
IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id for abuse monitoring",
    "safety_identifier": "an end-user id for abuse monitoring (OpenAI's successor of `user`)",
    "metadata": "tags for OpenAI's stored completions",
    "store": "whether OpenAI stores the completion",
    "service_tier": "OpenAI's billing / latency tier",
    "prompt_cache_key": "an OpenAI cache-routing hint (prefix caching is the `prefix_caching` setting)",
    "cache_prompt": "llama-server: reuse the KV cache (prefix caching is the `prefix_caching` setting)",
    "prediction": "OpenAI Predicted Outputs: a speed hint that never changes the text",
    "priority": "vLLM's scheduling priority (requests run in arrival order here)",
    "request_id": "vLLM: the client's id for the request",
}


class StrictRequestModel(OpenAIBaseModel):
    """A request (part) whose unknown fields are a validation error (-> 400 naming the field)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


# ---- errors ----------------------------------------------------------------------

class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- requests --------------------------------------------------------------------

class StreamOptions(StrictRequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False   # vLLM: usage in every chunk (400 when true: not supported)


class _SamplingRequest(StrictRequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions (mapping: server/request_params.py)."""
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
    ignore_eos: bool | None = False   # vLLM extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None   # vLLM extension (CTRL / HF)
    repeat_penalty: float | None = None       # llama-server's name for repetition_penalty
    n_predict: int | None = None              # llama-server's name for max_tokens (-1 = until the context is full)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None             # vLLM extension
    stop_token_ids: list[int] | None = None   # vLLM extension
    skip_special_tokens: bool | None = True   # vLLM extension
    include_stop_str_in_output: bool | None = False   # vLLM extension
    response_format: dict[str, Any] | None = None     # checked in server/structured_outputs.py
    structured_outputs: dict[str, Any] | None = None  # vLLM: {json | regex | choice | grammar | json_object}
    guided_json: dict[str, Any] | str | None = None   # vLLM's older aliases of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored_fields(cls, data: Any) -> Any:
        """Drop IGNORED_FIELDS, and unknown fields sent as null (clients that serialise every
        field they know; null is "not set", which cannot change the output)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if k not in IGNORED_FIELDS and (v is not None or k in cls.model_fields)}
        return data

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
    add_generation_prompt: bool | None = True   # vLLM extension
    # issue 12: tools / chat template / FIM (server/tool_choice.py, server/chat_rendering.py)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None   # None: auto with tools
    parallel_tool_calls: bool | None = None     # false: at most one call
    chat_template: str | None = None            # vLLM extension: a Jinja template for this request
    chat_template_kwargs: dict[str, Any] | None = None    # vLLM extension: extra template variables
    continue_final_message: bool | None = False  # vLLM extension: continue the last (assistant) message


class TokenizeRequest(StrictRequestModel):
    """vLLM's /tokenize: a completion `prompt` or chat `messages` (rendered with the chat template)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool | None = True
    add_special_tokens: bool | None = None    # default: True for a prompt, False for messages
    return_token_strs: bool | None = False


class DetokenizeRequest(StrictRequestModel):
    model: str | None = None
    tokens: list[int]


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
    system_fingerprint: str | None = None


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
    system_fingerprint: str | None = None


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
    system_fingerprint: str | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "amusd"
    root: str | None = None
    max_model_len: int | None = None
    sampling_defaults: dict[str, float] | None = None   # AMUSD: what a request that sets none of these gets


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
