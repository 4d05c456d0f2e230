"""The choices of one request, run one after another: engine outputs -> detokenised steps.

    runner = ChoiceRunner(client, tokenizer, runs)
    await runner.start()                       # admits the first run: 429 / 503 before any byte is sent
    async for run, step in runner.steps(): ... # every run's steps; the last of each has finish_reason
    runner.abort()                             # however the response ends (idempotent)

Choice `i * n + j` is sample j of prompt i (vLLM's order); with a seed, sample j uses seed + j as
vLLM's parallel sampling does. Each run is queued like a request of its own (the engine runs one
at a time), so the later runs of a large n hold no queue slot while the first runs.

A token that ended the request (EOS, or one of stop_token_ids) is counted but not detokenised,
unless include_stop_str_in_output (vLLM); a stop_token_ids hit is reported as stop_reason.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from engine.messages import SamplingParams
from server.detokenizer import IncrementalDetokenizer
from server.engine_client import EngineClient, EngineFailedError, EngineUnavailableError, RequestHandle
from server.responses import Step

STOP_DRAIN_TIMEOUT_S = 5.0     # after a stop string: wait this long for the engine's final stats


@dataclass
class Run:
    """One choice: a prompt and the params of one sample of it."""
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    include_stop_str: bool = False
    end_token_ids: frozenset[int] = frozenset()   # ids that end generation (EOS unless ignore_eos, stop ids)
    echo: str = ""                                  # completions with echo: the prompt's text
    is_first_sample: bool = True                    # sample 0 of its prompt (usage counts its prompt once)


class ChoiceRunner:
    def __init__(self, client: EngineClient, tokenizer: Any, runs: list[Run]) -> None:
        self.client, self.tokenizer, self.runs = client, tokenizer, runs
        self._handle: RequestHandle | None = None

    @property
    def request_id(self) -> int:
        return self._handle.request_id if self._handle is not None else 0

    async def _admit(self, run: Run) -> RequestHandle:
        handle = self.client.admit(run.prompt_ids, run.params)
        self._handle = handle
        try:
            await handle.wait_dispatched()
        except BaseException:
            handle.abort()
            raise
        return handle

    async def start(self) -> None:
        await self._admit(self.runs[0])

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.abort()

    async def steps(self) -> AsyncIterator[tuple[Run, Step]]:
        for i, run in enumerate(self.runs):
            handle = self._handle if i == 0 and self._handle is not None else await self._admit(run)
            try:
                async for step in self._run_steps(run, handle):
                    yield run, step
            finally:
                handle.abort()

    async def _run_steps(self, run: Run, handle: RequestHandle) -> AsyncIterator[Step]:
        detok = IncrementalDetokenizer(self.tokenizer, run.prompt_ids, run.stop, run.skip_special_tokens,
                                       run.include_stop_str)
        hidden = frozenset() if run.include_stop_str else run.end_token_ids
        outputs = handle.outputs()
        num_tokens, end_token = 0, None
        while True:
            timeout = STOP_DRAIN_TIMEOUT_S if detok.stopped else None
            try:
                out = await asyncio.wait_for(outputs.__anext__(), timeout)
            except (asyncio.TimeoutError, StopAsyncIteration):
                yield Step("", [], None, "stop", detok.stop_reason, None, num_tokens)
                return
            if out.prompt_logprobs is not None:
                yield Step("", [], None, prompt_logprobs=out.prompt_logprobs)
            if out.token_ids and not detok.stopped:
                ids = list(out.token_ids)
                last = ids.pop() if ids[-1] in hidden else None
                text, used = detok.add(ids)
                if detok.stopped:
                    handle.abort("stop")
                elif last is not None:
                    used, end_token = used + 1, last
                num_tokens += used
                lps = out.logprobs[:used] if out.logprobs else None
                if text or lps:
                    yield Step(text, list(out.token_ids[:used]), lps)
            if not out.finished:
                continue
            if detok.stopped:
                yield Step("", [], None, "stop", detok.stop_reason, out.stats, num_tokens)
            elif out.finish_reason == "error":
                raise EngineFailedError(f"the engine failed while generating: {out.error or 'unknown error'}")
            elif out.finish_reason == "cancelled":
                raise EngineUnavailableError("the request was cancelled by the server (shutting down)")
            else:
                stop_reason = end_token if out.finish_reason == "stop" and end_token in run.params.stop_token_ids \
                    else None
                yield Step(detok.flush(), [], None, out.finish_reason, stop_reason, out.stats, num_tokens)
            return
