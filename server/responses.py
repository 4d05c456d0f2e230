"""Builders of OpenAI response objects and stream chunks from the detokenised steps of a request.

`completion_events` / `chat_events` consume `ChoiceRunner.steps()` (one run per choice, one after
another) and yield JSON-ready dicts: when the request streams, one dict per SSE chunk, each naming
its choice `index` (chat: each choice starts with its role, then content deltas and its finish
reason; with include_usage a final `choices: []` chunk carries usage); otherwise exactly one dict,
the whole response. Usage sums the choices (a prompt counts once however many samples it has) and
carries the AMUSD `spec_decode` extension. Completions with `echo` prepend the prompt, and with
`logprobs` the prompt tokens' logprobs (the first one null, as OpenAI).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from engine.messages import RequestStats, TokenLogprob
from server import protocol as P
from server.tool_parsers import ToolParser

_MIN_LOGPROB = -9999.0   # JSON has no -inf (vLLM clamps the same way)


@dataclass
class Step:
    """A piece of one choice's output: text safe to emit, the tokens it came from; on the last step
    why it ended and how many tokens the choice generated; on an echo request's first, the prompt's logprobs."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    stats: RequestStats | None = None
    num_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None


class UsageTotal:
    """Token counts and engine stats summed over the choices of a request."""

    def __init__(self) -> None:
        self.num_prompt_tokens = self.num_completion_tokens = 0
        self.stats: RequestStats | None = None

    def add(self, run: Any, step: Step) -> None:
        if not step.finish_reason:
            return
        self.num_prompt_tokens += len(run.prompt_ids) if run.is_first_sample else 0
        self.num_completion_tokens += step.num_tokens
        if step.stats is not None:
            self.stats = step.stats if self.stats is None else self.stats.plus(step.stats)

    def info(self) -> P.UsageInfo:
        spec, s = None, self.stats
        if s is not None:
            spec = P.SpecDecodeUsage(
                num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                num_accepted_tokens=s.num_accepted_tokens, num_rollbacks=s.num_rollbacks,
                num_draft_tokens_wasted=s.num_draft_tokens_wasted,
                acceptance_rate=round(s.acceptance_rate, 4), tokens_per_verify=round(s.tokens_per_verify, 4))
        n_in, n_out = self.num_prompt_tokens, self.num_completion_tokens
        return P.UsageInfo(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out, spec_decode=spec)


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB) if not math.isnan(x) else _MIN_LOGPROB


def _clean(d: dict) -> dict:
    """Chunk dict without null usage (OpenAI omits it until the usage chunk)."""
    if d.get("usage") is None:
        d.pop("usage", None)
    return d


class _CompletionChoiceState:
    """One completion choice being built: its text pieces, logprobs and text offset."""

    def __init__(self, sv: Any, run: Any, want_lp: bool) -> None:
        self.sv, self.want_lp = sv, want_lp
        self.texts: list[str] = [run.echo]
        self.logprobs = P.CompletionLogProbs() if want_lp else None
        self.offset = 0

    def add_token(self, out: P.CompletionLogProbs, tid: int, lp: TokenLogprob | None) -> None:
        tok = self.sv.token_str(tid)
        out.tokens.append(tok)
        out.text_offset.append(self.offset)
        self.offset += len(tok)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            return
        out.token_logprobs.append(_lp(lp.logprob))
        top = {self.sv.token_str(t): _lp(v) for t, v in lp.top}
        top.setdefault(tok, _lp(lp.logprob))
        out.top_logprobs.append(top)

    def echo_logprobs(self, run: Any, prompt_lps: list[TokenLogprob | None] | None) -> P.CompletionLogProbs | None:
        """The prompt's tokens and logprobs (null where the engine gave none); then offsets go on after the echo."""
        if not self.want_lp:
            return None
        out = P.CompletionLogProbs()
        for i, tid in enumerate(run.prompt_ids):
            self.add_token(out, tid, prompt_lps[i] if prompt_lps and i < len(prompt_lps) else None)
        self.offset = len(run.echo)
        return out

    def step_logprobs(self, lps: list[TokenLogprob] | None) -> P.CompletionLogProbs | None:
        if not self.want_lp or not lps:
            return None
        out = P.CompletionLogProbs()
        for lp in lps:
            self.add_token(out, lp.token_id, lp)
        return out

    def keep(self, text: str, lps: P.CompletionLogProbs | None) -> None:
        self.texts.append(text)
        if lps is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(lps, name))


async def completion_events(sv: Any, req: P.CompletionRequest, runner: Any) -> AsyncIterator[dict]:
    rid, created, model, fp = P.random_id("cmpl"), int(time.time()), sv.model_name, sv.system_fingerprint
    stream = bool(req.stream)
    include_usage = stream and req.stream_options is not None and bool(req.stream_options.include_usage)
    states: dict[int, _CompletionChoiceState] = {}
    finished: dict[int, P.CompletionChoice] = {}
    usage = UsageTotal()

    def chunk(index: int, text: str, lps: P.CompletionLogProbs | None, finish: str | None = None,
              stop: str | int | None = None) -> dict:
        choice = P.CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=finish, stop_reason=stop)
        return _clean(P.CompletionResponse(id=rid, created=created, model=model, choices=[choice],
                                           system_fingerprint=fp).model_dump(mode="json"))

    async for run, step in runner.steps():
        state = states.get(run.index)
        if state is None:
            state = states[run.index] = _CompletionChoiceState(sv, run, req.logprobs is not None)
            if req.echo:
                echo_lps = state.echo_logprobs(run, step.prompt_logprobs)
                if stream:
                    yield chunk(run.index, run.echo, echo_lps)
                elif echo_lps is not None:
                    state.keep("", echo_lps)
        lps = state.step_logprobs(step.logprobs)
        usage.add(run, step)
        if stream:
            if step.text or lps is not None or step.finish_reason:
                yield chunk(run.index, step.text, lps, step.finish_reason, step.stop_reason)
            continue
        state.keep(step.text, lps)
        if step.finish_reason:
            finished[run.index] = P.CompletionChoice(index=run.index, text="".join(state.texts),
                                                     logprobs=state.logprobs, finish_reason=step.finish_reason,
                                                     stop_reason=step.stop_reason)
    if stream:
        if include_usage:
            yield P.CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage.info(),
                                       system_fingerprint=fp).model_dump(mode="json")
        return
    yield P.CompletionResponse(id=rid, created=created, model=model, choices=[finished[i] for i in sorted(finished)],
                               usage=usage.info(), system_fingerprint=fp).model_dump(mode="json")


def _chat_logprobs(sv: Any, lps: list[TokenLogprob] | None) -> list[P.ChatTokenLogprob]:
    out = []
    for lp in lps or []:
        tok = sv.token_str(lp.token_id)
        top = [P.TopLogprob(token=sv.token_str(t), logprob=_lp(v), bytes=sv.token_bytes(t)) for t, v in lp.top]
        out.append(P.ChatTokenLogprob(token=tok, logprob=_lp(lp.logprob), bytes=sv.token_bytes(lp.token_id),
                                      top_logprobs=top))
    return out


async def chat_events(sv: Any, req: P.ChatCompletionRequest, runner: Any,
                      make_tool_parser: Callable[[], ToolParser] | None = None) -> AsyncIterator[dict]:
    """With make_tool_parser (issue 12), tool calls are parsed out of each choice's content into `tool_calls`."""
    rid, created, model, fp = P.random_id("chatcmpl"), int(time.time()), sv.model_name, sv.system_fingerprint
    stream = bool(req.stream)
    include_usage = stream and req.stream_options is not None and bool(req.stream_options.include_usage)
    want_lp = bool(req.logprobs)
    texts: dict[int, list[str]] = {}
    all_lps: dict[int, list[P.ChatTokenLogprob]] = {}
    parsers: dict[int, ToolParser | None] = {}      # one per choice: streaming parsers hold state
    finished: dict[int, P.ChatChoice] = {}
    usage = UsageTotal()

    def chunk(index: int, delta: dict, lps: list | None = None, finish: str | None = None,
              stop: str | int | None = None) -> dict:
        choice = P.ChatStreamChoice(index=index, delta=P.DeltaMessage(), finish_reason=finish, stop_reason=stop,
                                    logprobs=P.ChatLogProbs(content=lps) if lps else None)
        d = _clean(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice],
                                         system_fingerprint=fp).model_dump(mode="json"))
        d["choices"][0]["delta"] = delta
        return d

    async for run, step in runner.steps():
        i = run.index
        if i not in texts:
            texts[i], all_lps[i] = [], []
            parsers[i] = make_tool_parser() if make_tool_parser is not None else None
            if stream:
                yield chunk(i, {"role": "assistant", "content": ""})
        parser = parsers[i]
        lps = _chat_logprobs(sv, step.logprobs) if want_lp else []
        usage.add(run, step)
        if stream and parser is not None:        # the text of a forming tool call is held back
            delta = parser.stream_delta(step.text, is_last=bool(step.finish_reason))
            if step.finish_reason:
                yield chunk(i, delta, lps, parser.finish_reason(step.finish_reason), step.stop_reason)
            elif delta or lps:
                yield chunk(i, delta, lps)
            continue
        if stream:
            if step.finish_reason:
                yield chunk(i, {"content": step.text} if step.text else {}, lps, step.finish_reason, step.stop_reason)
            elif step.text or lps:
                yield chunk(i, {"content": step.text}, lps)
            continue
        texts[i].append(step.text)
        all_lps[i].extend(lps)
        if step.finish_reason:
            content, tool_calls, finish_reason = "".join(texts[i]), [], step.finish_reason
            if parser is not None:
                content, calls = parser.extract_tool_calls(content)
                tool_calls, finish_reason = [c.to_openai() for c in calls], parser.finish_reason(finish_reason)
            finished[i] = P.ChatChoice(index=i, message=P.ChatResponseMessage(content=content, tool_calls=tool_calls),
                                       logprobs=P.ChatLogProbs(content=all_lps[i]) if want_lp else None,
                                       finish_reason=finish_reason, stop_reason=step.stop_reason)
    if stream:
        if include_usage:
            yield P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage.info(),
                                        system_fingerprint=fp).model_dump(mode="json")
        return
    yield P.ChatCompletionResponse(id=rid, created=created, model=model,
                                   choices=[finished[i] for i in sorted(finished)], usage=usage.info(),
                                   system_fingerprint=fp).model_dump(mode="json")
