"""The engine's one line of requests: who waits, who runs, who starts next (torch-free, no processes).

    line = Admission(max_model_len, max_num_waiting=16)
    line.put(request, on_output, on_start)    # any thread: join the line (first come, first served);
                                              #   LineFull when max_num_waiting already wait
    line.drop(request_id)                     # any thread: leave the line before starting -> its Waiting, or None
    line.take_startable()                     # scheduler thread: the first in line if it may start now, else None
    line.place(wid, waiting)                  # ... it runs on the workers under id `wid` (on_start is called)
    line.remove(wid)                          # ... it finished

This is the only queue between a caller (the HTTP frontend, `amusd bench`) and the workers: the
frontend adds nothing of its own, so what waits, what is refused (LineFull -> 429) and what is
counted as running are decided here, once.

A request may start when the workers have a place for it (`max_num_running`: the verify worker's
batch in `ar` / `sync`, else 1) and its KV reservation (engine/kv_budget.py) fits beside the running
ones' within `kv_budget_tokens`. The first in line that does not fit yet waits, and so does
everyone behind it: no request is overtaken, none starves.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, NamedTuple

from engine.kv_budget import kv_tokens_needed
from engine.messages import EngineOutput, GenerationRequest

OnOutput = Callable[[EngineOutput], None]
OnStart = Callable[[], None]


class LineFull(Exception):
    """`max_num_waiting` requests already wait: try again later."""


class Waiting(NamedTuple):
    """A request in the line."""
    request: GenerationRequest
    on_output: OnOutput
    on_start: OnStart | None = None          # called once, when it leaves the line for the workers


class Placed(NamedTuple):
    """A request on the workers."""
    request_id: int                  # the caller's id
    on_output: OnOutput
    num_kv_tokens: int               # its KV reservation


class Admission:
    def __init__(self, max_model_len: int, max_num_waiting: int | None = None):
        self.max_model_len = max_model_len
        self.max_num_waiting = max_num_waiting         # None: the line is unbounded
        self.max_num_running = 1
        self.kv_budget_tokens: int | None = None      # None: one request at a time, any length fits
        self.running: dict[int, Placed] = {}           # by worker request id; the scheduler thread writes it
        self._line: collections.deque[Waiting] = collections.deque()
        self._changed = threading.Condition()          # guards _line; notified when someone joins

    def check_fits(self, request: GenerationRequest) -> None:
        """ValueError for a request whose reservation exceeds the whole budget: it could never start."""
        need, budget = self.kv_tokens_of(request), self.kv_budget_tokens
        if budget is not None and need > budget:
            raise ValueError(f"prompt + max_tokens need {need} tokens of KV cache; the KV cache budget is {budget} "
                             "tokens (kv_cache_memory_gb): lower max_tokens or shorten the prompt")

    def put(self, request: GenerationRequest, on_output: OnOutput, on_start: OnStart | None = None) -> None:
        """Join the line, or LineFull. Requests about to take a free place do not count as waiting."""
        with self._changed:
            if self.max_num_waiting is not None:
                num_free_places = max(0, self.max_num_running - len(self.running))
                if len(self._line) >= self.max_num_waiting + num_free_places:
                    raise LineFull(f"the server is busy: {len(self._line)} requests are already waiting; "
                                   "try again later")
            self._line.append(Waiting(request, on_output, on_start))
            self._changed.notify()

    def drop(self, request_id: int) -> Waiting | None:
        """Take a waiting request out of the line (cancelled before it started); None if it is not there."""
        with self._changed:
            for waiting in self._line:
                if waiting.request.request_id == request_id:
                    self._line.remove(waiting)
                    return waiting
        return None

    def wait_for_arrival(self, timeout_s: float) -> bool:
        """Block until someone is in line (True) or timeout_s passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._line), timeout_s)

    def take(self) -> Waiting | None:
        """The first in line, room or not (None if nobody waits)."""
        with self._changed:
            return self._line.popleft() if self._line else None

    def take_startable(self, is_cancelled: Callable[[int], bool] = lambda request_id: False) -> Waiting | None:
        """The first in line if a place is free and its KV fits now, or if it was cancelled (to be
        answered at once, not started); else None (it keeps its turn)."""
        with self._changed:
            if not self._line:
                return None
            request = self._line[0].request
            if not is_cancelled(request.request_id):
                if len(self.running) >= self.max_num_running:
                    return None
                if self.running and self.kv_budget_tokens is not None and \
                        self.num_kv_tokens_reserved + self.kv_tokens_of(request) > self.kv_budget_tokens:
                    return None
            return self._line.popleft()

    def place(self, wid: int, waiting: Waiting) -> None:
        request, on_output, on_start = waiting
        self.running[wid] = Placed(request.request_id, on_output, self.kv_tokens_of(request))
        if on_start is not None:
            on_start()

    def remove(self, wid: int) -> Placed:
        return self.running.pop(wid)

    def kv_tokens_of(self, request: GenerationRequest) -> int:
        return kv_tokens_needed(len(request.prompt_token_ids), request.params.max_tokens, self.max_model_len)

    @property
    def num_waiting(self) -> int:
        return len(self._line)

    @property
    def num_kv_tokens_reserved(self) -> int:
        return sum(placed.num_kv_tokens for placed in list(self.running.values()))

    def kv_usage(self) -> dict | None:
        if self.kv_budget_tokens is None:
            return None
        return {"budget_tokens": self.kv_budget_tokens, "reserved_tokens": self.num_kv_tokens_reserved}
