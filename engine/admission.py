"""Which requests wait, which run on the workers, and which may start next (torch-free, no processes).

    line = Admission(max_model_len)
    line.put(request, on_output)              # any thread: join the line (first come, first served)
    line.take_startable()                     # scheduler thread: the first in line if it may start now, else None
    line.place(wid, request, on_output)       # ... it runs on the workers under id `wid`
    line.remove(wid)                          # ... it finished

A request may start when the workers have a place for it (`max_num_running`: the verify worker's
batch in `ar`, else 1) and its KV reservation (engine/kv_budget.py) fits beside the running
ones' within `kv_budget_tokens`. The first in line that does not fit yet waits, and so does
everyone behind it: no request is overtaken, none starves.
"""
from __future__ import annotations

import queue
from typing import Callable, NamedTuple

from engine.kv_budget import kv_tokens_needed
from engine.messages import EngineOutput, GenerationRequest

OnOutput = Callable[[EngineOutput], None]


class Placed(NamedTuple):
    """A request on the workers."""
    request_id: int                  # the caller's id
    on_output: OnOutput
    num_kv_tokens: int               # its KV reservation


class Admission:
    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len
        self.max_num_running = 1
        self.kv_budget_tokens: int | None = None      # None: one request at a time, any length fits
        self.running: dict[int, Placed] = {}           # by worker request id; the scheduler thread writes it
        self._fifo: queue.Queue[tuple[GenerationRequest, OnOutput]] = queue.Queue()
        self._next_up: tuple[GenerationRequest, OnOutput] | None = None   # taken from the FIFO, waiting for room

    def check_fits(self, request: GenerationRequest) -> None:
        """ValueError for a request whose reservation exceeds the whole budget: it could never start."""
        need, budget = self.kv_tokens_of(request), self.kv_budget_tokens
        if budget is not None and need > budget:
            raise ValueError(f"prompt + max_tokens need {need} tokens of KV cache; the KV cache budget is {budget} "
                             "tokens (kv_cache_memory_gb): lower max_tokens or shorten the prompt")

    def put(self, request: GenerationRequest, on_output: OnOutput) -> None:
        self._fifo.put((request, on_output))

    def take(self, timeout_s: float | None) -> tuple[GenerationRequest, OnOutput]:
        """The first in line, room or not (queue.Empty if none comes within timeout_s; None: don't wait)."""
        if self._next_up is not None:
            item, self._next_up = self._next_up, None
            return item
        return self._fifo.get(timeout=timeout_s) if timeout_s is not None else self._fifo.get_nowait()

    def take_startable(self, is_cancelled: Callable[[int], bool] = lambda request_id: False) \
            -> tuple[GenerationRequest, OnOutput] | None:
        """The first in line if a place is free and its KV fits now, or if it was cancelled (to be
        answered at once, not started); else None (it keeps its turn)."""
        if self._next_up is None:
            if len(self.running) >= self.max_num_running:
                return None
            try:
                self._next_up = self._fifo.get_nowait()
            except queue.Empty:
                return None
        request = self._next_up[0]
        if not is_cancelled(request.request_id):
            if len(self.running) >= self.max_num_running:
                return None
            if self.running and self.kv_budget_tokens is not None and \
                    self.num_kv_tokens_reserved + self.kv_tokens_of(request) > self.kv_budget_tokens:
                return None
        return self.take(timeout_s=None)

    def place(self, wid: int, request: GenerationRequest, on_output: OnOutput) -> None:
        self.running[wid] = Placed(request.request_id, on_output, self.kv_tokens_of(request))

    def remove(self, wid: int) -> Placed:
        return self.running.pop(wid)

    def kv_tokens_of(self, request: GenerationRequest) -> int:
        return kv_tokens_needed(len(request.prompt_token_ids), request.params.max_tokens, self.max_model_len)

    @property
    def num_waiting(self) -> int:
        return self._fifo.qsize() + (self._next_up is not None)

    @property
    def num_kv_tokens_reserved(self) -> int:
        return sum(placed.num_kv_tokens for placed in list(self.running.values()))

    def kv_usage(self) -> dict | None:
        if self.kv_budget_tokens is None:
            return None
        return {"budget_tokens": self.kv_budget_tokens, "reserved_tokens": self.num_kv_tokens_reserved}
