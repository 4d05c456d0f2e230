"""Completion, chat-completion and tokenizer endpoints: request -> choices -> OpenAI response.

Turns a request into prompt token ids (completion prompts, or chat messages rendered with the
tokenizer's chat template) and one Run per choice (n samples of each prompt;
server/request_params.py maps the fields to SamplingParams), runs them through a ChoiceRunner and
builds OpenAI objects: one JSON response, or SSE chunks (`data: {...}` ... `data: [DONE]`). An
engine failure mid-stream becomes an error event followed by `data: [DONE]`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
from typing import Any, AsyncIterator, Callable, Sequence

from starlette.responses import JSONResponse, Response, StreamingResponse

from server import protocol as P
from server.chat_rendering import ChatRenderer
from server.choice_runner import ChoiceRunner, Run
from server.engine_client import EngineClient, EngineClientError
from server.errors import OpenAIError, error_body   # noqa: F401  (re-exported for server/app.py)
from server.fim import FimPrompter
from server.request_params import SamplingParamsFactory, check_in_vocab, check_unicode
from server.responses import chat_events, completion_events
from server.settings import Settings
from server.tool_choice import plan_tools
from server.tool_parsers import get_tool_parser

logger = logging.getLogger("amusd.server")


def server_version() -> str:
    try:
        return importlib.metadata.version("amusd-server")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout without `pip install -e .`
        return "0.0.0+checkout"


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
                 model_root: str, max_model_len: int, vocab_size: int, eos_token_ids: Sequence[int] = (),
                 sampling_defaults: dict[str, float] | None = None) -> None:
        self.settings, self.client, self.tokenizer = settings, client, tokenizer
        self.model_name, self.model_root = model_name, model_root
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.params = SamplingParamsFactory(settings, vocab_size, max_model_len, sampling_defaults or {})
        self._token_str_cache: dict[int, str] = {}
        self._byte_decoder = _byte_decoder(tokenizer)
        self.chat_renderer = ChatRenderer(tokenizer, settings.trust_request_chat_template)
        self.tool_parser_cls = get_tool_parser(settings.tool_call_parser)
        self.added_tokens = frozenset(tokenizer.get_added_vocab())
        self.fim = FimPrompter(tokenizer)
        # what decides the output besides the request: the server build, the model and the decoding
        backend = [server_version(), model_root, settings.mode, settings.dtype, settings.verify_quantization,
                   settings.sampling_scheme, sorted(self.params.defaults_in_force().items())]
        self.system_fingerprint = "fp_" + hashlib.sha256(json.dumps(backend).encode()).hexdigest()[:12]

    def models(self) -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=self.model_name, root=self.model_root,
                                             max_model_len=self.max_model_len,
                                             sampling_defaults=self.params.defaults_in_force())])

    # ---- prompts -----------------------------------------------------------------------
    def _completion_prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt: a string, token ids, or a list of either."""
        many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        out = []
        for i, one in enumerate(prompt if many else [prompt]):
            param = f"prompt.{i}" if many else "prompt"
            if isinstance(one, str):
                check_unicode(one, param)
                out.append((self.tokenizer.encode(one, add_special_tokens=True) if one else [], one))
                continue
            check_in_vocab(one, self.vocab_size, param)
            out.append((list(one), self.tokenizer.decode(list(one))))
        return out

    def _chat_prompt(self, req: P.ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> list[int]:
        text = self.chat_renderer.render(req, tools)     # server/chat_rendering.py
        check_unicode(text, "messages")
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
    def _runs(self, req: P._SamplingRequest, prompts: list[tuple[list[int], str]], max_tokens: int | None,
              num_logprobs: int | None, num_prompt_logprobs: int | None = None, echo: bool = False,
              extra_stop_ids: Sequence[int] = (), grammar=None) -> list[Run]:
        """One Run per choice: sample j of prompt i is choice i * n + j (seed + j when seeded).

        extra_stop_ids: FIM's end tokens; grammar: tool_choice's constraint (exclusive with
        response_format / guided decoding).
        """
        n = req.n or 1
        if n * len(prompts) > self.settings.max_choices:
            raise OpenAIError(f"{len(prompts)} prompts x n={n} choices; at most {self.settings.max_choices} "
                              "per request", param="n" if len(prompts) == 1 else "prompt")
        runs = []
        for i, (ids, text) in enumerate(prompts):
            params = self.params.build(req, len(ids), max_tokens, num_logprobs, num_prompt_logprobs)
            if extra_stop_ids:
                params.stop_token_ids = sorted({*params.stop_token_ids, *extra_stop_ids})
            if grammar is not None:
                if params.grammar is not None:
                    raise OpenAIError("tool_choice (required or a named function) cannot be combined with "
                                      "response_format or guided decoding", param="tool_choice")
                params.grammar = grammar
            end_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
            for j in range(n):
                seed = params.seed + j if params.seed is not None and j else params.seed
                runs.append(Run(i * n + j, ids, dataclasses.replace(params, seed=seed), req.stop_list(),
                                req.skip_special_tokens is not False, bool(req.include_stop_str_in_output),
                                end_ids, text if echo else "", is_first_sample=j == 0))
        return runs

    async def stream(self, runner: ChoiceRunner, events: AsyncIterator[dict]) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield _sse(event)
        except (EngineClientError, OpenAIError) as exc:
            yield _sse(error_body(str(exc), getattr(exc, "type", "internal_server_error"), None,
                                  getattr(exc, "code", None)))
        except Exception as exc:   # asyncio.CancelledError (disconnect) is BaseException: not caught
            logger.exception("error while streaming request %d", runner.request_id)
            yield _sse(error_body(f"internal error: {exc}", "internal_server_error"))
        finally:
            runner.abort()
        yield "data: [DONE]\n\n"

    async def respond(self, runs: list[Run], make_events: Callable[[ChoiceRunner], AsyncIterator[dict]],
                      streaming: bool) -> Response:
        """Admit the first run (429 / 503 come as HTTP errors), then stream SSE or return the one event."""
        runner = ChoiceRunner(self.client, self.tokenizer, runs)
        await runner.start()
        if streaming:
            return _EngineStream(self.stream(runner, make_events(runner)), on_close=runner.abort)
        try:
            result = None
            async for event in make_events(runner):
                result = event
            return JSONResponse(result)
        finally:
            runner.abort()

    async def create_completion(self, req: P.CompletionRequest) -> Response:
        self.params.check_request(req, self.model_name)
        if req.best_of not in (None, 1):
            raise OpenAIError("only best_of=1 is supported", param="best_of")
        prompts = self._completion_prompts(req.prompt)
        extra_stop_ids: Sequence[int] = ()
        if req.suffix is not None:            # fill-in-the-middle (server/fim.py)
            if req.echo:
                raise OpenAIError("echo cannot be combined with suffix", param="suffix")
            prompts = [(self.fim.prompt_ids(ids, req.suffix), text) for ids, text in prompts]
            extra_stop_ids = self.fim.stop_token_ids
        max_tokens = self.params.max_tokens(req, req.max_tokens, "max_tokens" in req.model_fields_set)
        echo_lps = req.logprobs if req.echo and req.logprobs is not None else None
        runs = self._runs(req, prompts, max_tokens, req.logprobs, echo_lps, echo=bool(req.echo),
                          extra_stop_ids=extra_stop_ids)
        return await self.respond(runs, lambda runner: completion_events(self, req, runner), bool(req.stream))

    async def create_chat_completion(self, req: P.ChatCompletionRequest) -> Response:
        self.params.check_request(req, self.model_name)
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs requires logprobs=true", param="top_logprobs")
        tool_plan = plan_tools(req, self.tool_parser_cls, self.added_tokens)   # server/tool_choice.py
        ids = self._chat_prompt(req, tool_plan.tools)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.params.max_tokens(req, requested, requested is not None)
        runs = self._runs(req, [(ids, "")], max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                          grammar=tool_plan.grammar)
        make_parser = tool_plan.new_parser if tool_plan.parser_cls is not None else None
        return await self.respond(runs, lambda runner: chat_events(self, req, runner, make_parser), bool(req.stream))

    # ---- tokenizer endpoints (vLLM's shapes) ------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")

    def tokenize(self, req: P.TokenizeRequest) -> P.TokenizeResponse:
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("send exactly one of `prompt` and `messages`", param="prompt")
        if req.prompt is not None:
            check_unicode(req.prompt, "prompt")
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            chat = P.ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                           add_generation_prompt=req.add_generation_prompt)
            ids = self._chat_prompt(chat, [t.model_dump(exclude_none=True) for t in chat.tools or []] or None)
            if req.add_special_tokens:
                ids = self.tokenizer.build_inputs_with_special_tokens(ids)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return P.TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        self._check_model(req.model)
        check_in_vocab(req.tokens, self.vocab_size, "tokens")
        return P.DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))
