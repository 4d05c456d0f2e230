"""Completion and chat-completion logic: request -> GenerationRequest -> EngineOutputs -> response.

Validates what needs the model (context length, vocab, limits), renders chat messages with the
tokenizer's chat template, runs the request through the EngineClient and builds OpenAI objects:
one JSON response, or SSE chunks (`data: {...}` ... `data: [DONE]`). An engine failure mid-stream
becomes an error event followed by `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.messages import SamplingParams
from server import protocol as P
from server.chat_rendering import ChatRenderer
from server.detokenizer import IncrementalDetokenizer
from server.errors import OpenAIError   # moved there (issue 12); server.app imports it from here
from server.fim import FimPrompter
from server.responses import Step, chat_events, completion_events
from server.engine_client import (EngineClient, EngineClientError, EngineFailedError,
                                  EngineUnavailableError, RequestHandle)
from server.settings import Settings
from server.tool_choice import plan_tools
from server.tool_parsers import get_tool_parser

logger = logging.getLogger("amusd.server")
MAX_STOP_STRING_CHARS = 1024
STOP_DRAIN_TIMEOUT_S = 5.0     # after a stop string: wait this long for the engine's final stats


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


class _EngineStream(StreamingResponse):
    """StreamingResponse that aborts the engine request however the response ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError("the text contains invalid Unicode (a lone surrogate)", param=param) from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2 style unicode->byte map if the tokenizer is byte-level BPE, else None."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class OpenAIServing:
    def __init__(self, settings: Settings, client: EngineClient, tokenizer: Any, model_name: str,
                 model_root: str, max_model_len: int, vocab_size: int) -> None:
        self.settings, self.client, self.tokenizer = settings, client, tokenizer
        self.model_name, self.model_root = model_name, model_root
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self._token_str_cache: dict[int, str] = {}
        self._byte_decoder = _byte_decoder(tokenizer)
        # issue 12: tools / chat template / FIM
        self.chat_renderer = ChatRenderer(tokenizer, settings.trust_request_chat_template)
        self.tool_parser_cls = get_tool_parser(settings.tool_call_parser)
        self.fim = FimPrompter(tokenizer)

    def models(self) -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=self.model_name, root=self.model_root,
                                             max_model_len=self.max_model_len)])

    # ---- validation ------------------------------------------------------------------
    def _check_common(self, req: P._SamplingRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise OpenAIError(f"The model `{req.model}` does not exist.", 404, param="model",
                              code="model_not_found")
        if req.n not in (None, 1):
            raise OpenAIError("only n=1 is supported", param="n")
        if req.stream_options is not None and not req.stream:
            raise OpenAIError("stream_options can only be set when stream=true", param="stream_options")
        if req.logit_bias:
            raise OpenAIError("logit_bias is not supported", param="logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise OpenAIError(f"{name} is not supported (must be 0)", param=name)
        if req.repetition_penalty not in (None, 1, 1.0):
            raise OpenAIError("repetition_penalty is not supported (must be 1)", param="repetition_penalty")
        stops = req.stop_list()
        if len(stops) > self.settings.max_stop_strings:
            raise OpenAIError(f"at most {self.settings.max_stop_strings} stop strings are allowed", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise OpenAIError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters", param="stop")
        for stop in stops:
            _check_unicode(stop, "stop")

    def _params(self, req: P._SamplingRequest, prompt_len: int, max_tokens: int | None,
                num_logprobs: int | None) -> SamplingParams:
        s = self.settings
        if prompt_len == 0:
            raise OpenAIError("the prompt must not be empty", param="prompt")
        if prompt_len > min(s.max_prompt_tokens, self.max_model_len - 1):
            raise OpenAIError(f"the prompt has {prompt_len} tokens; at most "
                              f"{min(s.max_prompt_tokens, self.max_model_len - 1)} are allowed", param="prompt")
        if max_tokens is None:
            max_tokens = min(s.max_tokens_limit, self.max_model_len - prompt_len)
        elif isinstance(max_tokens, int) and max_tokens > s.max_tokens_limit:
            raise OpenAIError(f"max_tokens must be <= {s.max_tokens_limit}, got {max_tokens}", param="max_tokens")
        elif isinstance(max_tokens, int) and prompt_len + max_tokens > self.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                              f"{max_tokens} for the completion).", param="max_tokens")
        top_k = req.top_k if req.top_k not in (None, -1) else 0
        params = SamplingParams(
            max_tokens=max_tokens, top_k=top_k, seed=req.seed, num_logprobs=num_logprobs,
            temperature=req.temperature if req.temperature is not None else s.default_temperature,
            top_p=req.top_p if req.top_p is not None else 1.0,
            min_p=req.min_p if req.min_p is not None else 0.0, ignore_eos=bool(req.ignore_eos))
        try:
            params.validate()
        except ValueError as exc:
            raise OpenAIError(str(exc), param=str(exc).split(" ", 1)[0]) from None
        return params

    def _completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise OpenAIError("batched prompts are not supported; send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            _check_unicode(prompt, "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise OpenAIError(f"token id {bad} is out of vocabulary (size {self.vocab_size})", param="prompt")
        return list(prompt)

    def _chat_prompt(self, req: P.ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> list[int]:
        text = self.chat_renderer.render(req, tools)
        _check_unicode(text, "messages")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def token_str(self, tid: int) -> str:
        s = self._token_str_cache.get(tid)
        if s is None:
            s = self._token_str_cache[tid] = self.tokenizer.decode([tid])
        return s

    def token_bytes(self, tid: int) -> list[int]:
        """The token's raw UTF-8 bytes (a byte-level BPE token may be part of a character)."""
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(tid)
            if piece and all(c in self._byte_decoder for c in piece):
                return [self._byte_decoder[c] for c in piece]
        return list(self.token_str(tid).encode("utf-8"))

    # ---- generation ------------------------------------------------------------------
    async def _admit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        handle = self.client.admit(ids, params)
        try:
            await handle.wait_dispatched()
        except BaseException:
            handle.abort()
            raise
        return handle

    async def steps(self, handle: RequestHandle, detok: IncrementalDetokenizer) -> AsyncIterator[Step]:
        """Detokenised steps; the last one carries finish_reason (+ stats)."""
        outputs = handle.outputs()
        while True:
            timeout = STOP_DRAIN_TIMEOUT_S if detok.stopped else None
            try:
                out = await asyncio.wait_for(outputs.__anext__(), timeout)
            except (asyncio.TimeoutError, StopAsyncIteration):
                yield Step("", [], None, "stop", detok.stop_reason, None)
                return
            if out.token_ids and not detok.stopped:
                text, used = detok.add(out.token_ids)
                if detok.stopped:
                    handle.abort("stop")
                lps = out.logprobs[:used] if out.logprobs else None
                if text or lps:
                    yield Step(text, list(out.token_ids[:used]), lps)
            if not out.finished:
                continue
            if detok.stopped:
                yield Step("", [], None, "stop", detok.stop_reason, out.stats)
            elif out.finish_reason == "error":
                raise EngineFailedError(f"the engine failed while generating: {out.error or 'unknown error'}")
            elif out.finish_reason == "cancelled":
                raise EngineUnavailableError("the request was cancelled by the server (shutting down)")
            else:
                yield Step(detok.flush(), [], None, out.finish_reason, None, out.stats)
            return

    async def stream(self, handle: RequestHandle, events: AsyncIterator[dict]) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield _sse(event)
        except (EngineClientError, OpenAIError) as exc:
            yield _sse(error_body(str(exc), getattr(exc, "type", "internal_server_error"), None,
                                  getattr(exc, "code", None)))
        except Exception as exc:   # asyncio.CancelledError (disconnect) is BaseException: not caught
            logger.exception("error while streaming request %d", handle.request_id)
            yield _sse(error_body(f"internal error: {exc}", "internal_server_error"))
        finally:
            handle.abort()
        yield "data: [DONE]\n\n"

    async def respond(self, handle: RequestHandle, events: AsyncIterator[dict], streaming: bool) -> Response:
        """Streaming: an SSE response over `events`. Otherwise the single event, as JSON."""
        if streaming:
            return _EngineStream(self.stream(handle, events), on_close=handle.abort)
        try:
            result = None
            async for event in events:
                result = event
            return JSONResponse(result)
        finally:
            handle.abort()

    async def create_completion(self, req: P.CompletionRequest) -> Response:
        self._check_common(req)
        if req.best_of not in (None, 1):
            raise OpenAIError("only best_of=1 is supported", param="best_of")
        if req.echo and req.logprobs is not None:
            raise OpenAIError("echo with logprobs (prompt logprobs) is not supported", param="echo")
        ids = self._completion_prompt(req.prompt)
        if req.suffix is not None:   # issue 12: fill-in-the-middle
            if req.echo:
                raise OpenAIError("echo cannot be combined with suffix", param="suffix")
            ids = self.fim.prompt_ids(ids, req.suffix)
        params = self._params(req, len(ids), req.max_tokens, req.logprobs)
        if req.suffix is not None:
            params.stop_token_ids = sorted({*params.stop_token_ids, *self.fim.stop_token_ids})
        handle = await self._admit(ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, ids, req.stop_list())
        return await self.respond(handle, completion_events(self, req, handle, detok, ids), bool(req.stream))

    async def create_chat_completion(self, req: P.ChatCompletionRequest) -> Response:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs requires logprobs=true", param="top_logprobs")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise OpenAIError(f"response_format {fmt!r} is not supported", param="response_format")
        tool_plan = plan_tools(req, self.tool_parser_cls)   # issue 12: tools
        ids = self._chat_prompt(req, tool_plan.tools)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, len(ids), max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        if tool_plan.grammar is not None:
            if params.grammar is not None:
                raise OpenAIError("tool_choice (required or a named function) cannot be combined with "
                                  "response_format or guided decoding", param="tool_choice")
            params.grammar = tool_plan.grammar
        handle = await self._admit(ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, ids, req.stop_list())
        return await self.respond(handle, chat_events(self, req, handle, detok, ids, tool_plan.new_parser()),
                                  bool(req.stream))
