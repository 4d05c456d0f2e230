"""Builders of OpenAI response objects and stream chunks from detokenised engine steps.

`completion_events` / `chat_events` consume `serving.steps(...)` and yield JSON-ready dicts: when
the request streams, one dict per SSE chunk (chat: the role first, then content deltas, the finish
reason, and with include_usage a final `choices: []` chunk carrying usage); otherwise exactly one
dict, the whole response. Usage carries the AMUSD `spec_decode` extension.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from engine.messages import RequestStats, TokenLogprob
from server import protocol as P
from server.tool_parsers import ToolParser

_MIN_LOGPROB = -9999.0   # JSON has no -inf (vLLM clamps the same way)


@dataclass
class Step:
    """A piece of output: text safe to emit, the tokens it came from, and on the last step why."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: str | None = None
    stats: RequestStats | None = None


def usage_info(prompt_len: int, n_out: int, stats: RequestStats | None) -> P.UsageInfo:
    spec = None
    if stats is not None:
        spec = P.SpecDecodeUsage(
            num_drafts=stats.num_drafts, num_draft_tokens=stats.num_draft_tokens,
            num_accepted_tokens=stats.num_accepted_tokens, num_rollbacks=stats.num_rollbacks,
            num_draft_tokens_wasted=stats.num_draft_tokens_wasted,
            acceptance_rate=round(stats.acceptance_rate, 4), tokens_per_verify=round(stats.tokens_per_verify, 4))
    return P.UsageInfo(prompt_tokens=prompt_len, completion_tokens=n_out, total_tokens=prompt_len + n_out,
                       spec_decode=spec)


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB) if not math.isnan(x) else _MIN_LOGPROB


def _clean(d: dict) -> dict:
    """Chunk dict without null usage (OpenAI omits it until the usage chunk)."""
    if d.get("usage") is None:
        d.pop("usage", None)
    return d


async def completion_events(sv: Any, req: P.CompletionRequest, handle: Any, detok: Any,
                            ids: list[int]) -> AsyncIterator[dict]:
    rid, created, model = P.random_id("cmpl"), int(time.time()), sv.model_name
    stream = bool(req.stream)
    include_usage = stream and req.stream_options is not None and bool(req.stream_options.include_usage)
    want_lp = req.logprobs is not None
    echo = ""
    if req.echo:
        echo = req.prompt if isinstance(req.prompt, str) else sv.tokenizer.decode(ids)
    offset = len(echo)

    def logprobs_of(lps: list[TokenLogprob] | None) -> P.CompletionLogProbs | None:
        nonlocal offset
        if not want_lp or not lps:
            return None
        out = P.CompletionLogProbs()
        for lp in lps:
            tok = sv.token_str(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(_lp(lp.logprob))
            top = {sv.token_str(t): _lp(v) for t, v in lp.top}
            top.setdefault(tok, _lp(lp.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def chunk(text: str, lps: P.CompletionLogProbs | None, finish: str | None = None, stop: str | None = None):
        choice = P.CompletionChoice(text=text, logprobs=lps, finish_reason=finish, stop_reason=stop)
        return _clean(P.CompletionResponse(id=rid, created=created, model=model,
                                           choices=[choice]).model_dump(mode="json"))

    if stream and echo:
        yield chunk(echo, None)
    texts, all_lps, last = [echo], P.CompletionLogProbs() if want_lp else None, None
    async for step in sv.steps(handle, detok):
        lps = logprobs_of(step.logprobs)
        if stream:
            if step.text or lps is not None or step.finish_reason:
                yield chunk(step.text, lps, step.finish_reason, step.stop_reason)
        else:
            texts.append(step.text)
            if lps is not None:
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(all_lps, field).extend(getattr(lps, field))
        last = step
    usage = usage_info(len(ids), detok.num_tokens, last.stats if last else None)
    if stream:
        if include_usage:
            yield P.CompletionResponse(id=rid, created=created, model=model, choices=[],
                                       usage=usage).model_dump(mode="json")
        return
    choice = P.CompletionChoice(text="".join(texts), logprobs=all_lps, finish_reason=last.finish_reason,
                                stop_reason=last.stop_reason)
    yield P.CompletionResponse(id=rid, created=created, model=model, choices=[choice],
                               usage=usage).model_dump(mode="json")


def _chat_logprobs(sv: Any, lps: list[TokenLogprob] | None) -> list[P.ChatTokenLogprob]:
    out = []
    for lp in lps or []:
        tok = sv.token_str(lp.token_id)
        top = [P.TopLogprob(token=sv.token_str(t), logprob=_lp(v), bytes=sv.token_bytes(t)) for t, v in lp.top]
        out.append(P.ChatTokenLogprob(token=tok, logprob=_lp(lp.logprob), bytes=sv.token_bytes(lp.token_id),
                                      top_logprobs=top))
    return out


async def chat_events(sv: Any, req: P.ChatCompletionRequest, handle: Any, detok: Any,
                      ids: list[int], tool_parser: ToolParser | None = None) -> AsyncIterator[dict]:
    """With a tool_parser (issue 12), tool calls are parsed out of the content into `tool_calls`."""
    rid, created, model = P.random_id("chatcmpl"), int(time.time()), sv.model_name
    stream = bool(req.stream)
    include_usage = stream and req.stream_options is not None and bool(req.stream_options.include_usage)
    want_lp = bool(req.logprobs)

    def chunk(delta: dict, lps: list | None = None, finish: str | None = None, stop: str | None = None):
        choice = P.ChatStreamChoice(delta=P.DeltaMessage(), finish_reason=finish, stop_reason=stop,
                                    logprobs=P.ChatLogProbs(content=lps) if lps else None)
        d = _clean(P.ChatCompletionChunk(id=rid, created=created, model=model,
                                         choices=[choice]).model_dump(mode="json"))
        d["choices"][0]["delta"] = delta
        return d

    if stream:
        yield chunk({"role": "assistant", "content": ""})
    texts, all_lps, last = [], [], None
    async for step in sv.steps(handle, detok):
        lps = _chat_logprobs(sv, step.logprobs) if want_lp else []
        if stream and tool_parser is not None:   # issue 12: text of a forming call is held back
            delta = tool_parser.stream_delta(step.text, is_last=bool(step.finish_reason))
            if step.finish_reason:
                yield chunk(delta, lps, tool_parser.finish_reason(step.finish_reason), step.stop_reason)
            elif delta or lps:
                yield chunk(delta, lps)
        elif stream:
            if step.finish_reason:
                yield chunk({"content": step.text} if step.text else {}, lps, step.finish_reason, step.stop_reason)
            elif step.text or lps:
                yield chunk({"content": step.text}, lps)
        else:
            texts.append(step.text)
            all_lps.extend(lps)
        last = step
    usage = usage_info(len(ids), detok.num_tokens, last.stats if last else None)
    if stream:
        if include_usage:
            yield P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                        usage=usage).model_dump(mode="json")
        return
    content, tool_calls, finish_reason = "".join(texts), [], last.finish_reason
    if tool_parser is not None:   # issue 12
        content, calls = tool_parser.extract_tool_calls(content)
        tool_calls, finish_reason = [c.to_openai() for c in calls], tool_parser.finish_reason(finish_reason)
    choice = P.ChatChoice(message=P.ChatResponseMessage(content=content, tool_calls=tool_calls),
                          logprobs=P.ChatLogProbs(content=all_lps) if want_lp else None,
                          finish_reason=finish_reason, stop_reason=last.stop_reason)
    yield P.ChatCompletionResponse(id=rid, created=created, model=model, choices=[choice],
                                   usage=usage).model_dump(mode="json")
