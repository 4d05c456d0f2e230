"""One streamed OpenAI request, timed: the load generator's measuring instrument.

`send_request` POSTs to /v1/chat/completions or /v1/completions with stream=true and
stream_options.include_usage, parses the server-sent events by hand (`data: ` lines until
`data: [DONE]`) and fills a `RequestResult` in place, so that a request cancelled by the
overall timeout still shows how far it got. Statuses:

    completed     [DONE] arrived and a choice had a finish_reason
    http_error    the server answered 4xx / 5xx (code in http_status)
    stream_error  the stream carried an error object or a line that is not JSON
    dropped       the connection failed or broke (connect error, reset, read timeout)
    truncated     the stream ended without [DONE] or without a finish_reason
    disconnected  the client hung up on purpose (--disconnect-fraction)
    timed_out     the run's --timeout-s ran out first (set by the runner)
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from loadtest.datasets import Prompt

STATUS_NOT_STARTED = "not_started"
STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_HTTP_ERROR = "http_error"
STATUS_STREAM_ERROR = "stream_error"
STATUS_DROPPED = "dropped"
STATUS_TRUNCATED = "truncated"
STATUS_DISCONNECTED = "disconnected"
STATUS_TIMED_OUT = "timed_out"
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run sends."""
    endpoint: str = "chat"              # chat | completions
    model: str = ""                     # "" = the first id of GET /v1/models
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class RequestPlan:
    index: int
    prompt: Prompt
    send_at_s: float = 0.0                     # planned start, seconds after the run starts
    disconnect_after_chunks: int | None = None  # hang up after this many content chunks


@dataclass
class RequestResult:
    index: int
    prompt: str = ""                           # the prompt's text (chat: the text of its messages)
    status: str = STATUS_NOT_STARTED
    http_status: int | None = None
    start_s: float | None = None               # seconds after the run start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)  # seconds after the run start
    num_chunks: int = 0                        # chunks that carried text
    num_usage_tokens: int | None = None        # usage.completion_tokens, when the server sent it
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""                             # the generated text, as streamed

    @property
    def num_output_tokens(self) -> int:
        return self.num_usage_tokens if self.num_usage_tokens is not None else self.num_chunks

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.e2e_s is None or self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    def to_record(self, *, is_detailed: bool = False) -> dict:
        record = asdict(self)
        record["num_output_tokens"] = self.num_output_tokens
        record["tpot_s"] = self.tpot_s
        if not is_detailed:
            record.pop("itl_s")
            record.pop("chunk_times_s")
        return record


# The bare model on every server: amusd (like vLLM) applies the model's generation_config defaults,
# which for Qwen2.5 include repetition_penalty 1.1; llama-server calls it repeat_penalty (default 1.0).
NO_PENALTY = {"repetition_penalty": 1.0, "repeat_penalty": 1.0}


def build_payload(options: RequestOptions, prompt: Prompt) -> dict:
    payload: dict = {"model": options.model, "max_tokens": options.max_tokens,
                     "temperature": options.temperature, "stream": True,
                     "stream_options": {"include_usage": True}, **NO_PENALTY}
    if options.ignore_eos:
        payload["ignore_eos"] = True
    if options.endpoint == "chat":
        payload["messages"] = prompt.chat_messages()
    else:
        payload["prompt"] = prompt.text
    return payload


def chunk_text(chunk: dict, endpoint: str) -> tuple[str, str | None]:
    """(text of the chunk, finish_reason or None) over all its choices."""
    texts, finish_reason = [], None
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            texts.append((choice.get("delta") or {}).get("content") or "")
        else:
            texts.append(choice.get("text") or "")
        finish_reason = choice.get("finish_reason") or finish_reason
    return "".join(texts), finish_reason


async def send_request(client: httpx.AsyncClient, options: RequestOptions, plan: RequestPlan,
                       result: RequestResult, run_start: float) -> None:
    """Send one request and fill `result` as the stream arrives."""
    start = time.perf_counter()
    result.status, result.start_s = STATUS_RUNNING, start - run_start
    last_chunk_at: float | None = None
    is_done = False
    try:
        payload = build_payload(options, plan.prompt)
        async with client.stream("POST", ENDPOINT_PATHS[options.endpoint], json=payload) as response:
            result.http_status = response.status_code
            if response.status_code >= 400:
                body = await response.aread()
                result.status, result.error = STATUS_HTTP_ERROR, body.decode(errors="replace")[:MAX_ERROR_CHARS]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    is_done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    result.status, result.error = STATUS_STREAM_ERROR, f"not JSON: {data[:MAX_ERROR_CHARS]}"
                    return
                if not isinstance(chunk, dict) or "error" in chunk:
                    result.status, result.error = STATUS_STREAM_ERROR, data[:MAX_ERROR_CHARS]
                    return
                now = time.perf_counter()
                usage = chunk.get("usage") or {}
                if isinstance(usage.get("completion_tokens"), int):
                    result.num_usage_tokens = usage["completion_tokens"]
                text, finish_reason = chunk_text(chunk, options.endpoint)
                result.finish_reason = finish_reason or result.finish_reason
                if text:
                    result.text += text
                    if last_chunk_at is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last_chunk_at)
                    last_chunk_at = now
                    result.chunk_times_s.append(now - run_start)
                    result.num_chunks += 1
                    if plan.disconnect_after_chunks and result.num_chunks >= plan.disconnect_after_chunks:
                        result.status = STATUS_DISCONNECTED
                        return
        is_complete = is_done and result.finish_reason is not None
        result.status = STATUS_COMPLETED if is_complete else STATUS_TRUNCATED
        if not is_complete:
            result.error = "stream ended without " + ("a finish_reason" if is_done else "[DONE]")
    except httpx.TransportError as exc:
        result.status, result.error = STATUS_DROPPED, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    finally:
        result.e2e_s = time.perf_counter() - start


async def fetch_model_name(client: httpx.AsyncClient) -> str | None:
    """The first model id from GET /v1/models, or None if the server does not say."""
    try:
        response = await client.get("/v1/models")
        if response.status_code != 200:
            return None
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return models[0].get("id") if models and isinstance(models[0], dict) else None
