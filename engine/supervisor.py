"""Engine supervisor: owns the worker processes, the shared buffers and the line of requests.

Process topology (the supervisor lives in the frontend process; torch is imported only by workers):

    frontend process                         | draft worker process (async only)
    ------------------------------------------|-----------------------------------------
    FastAPI / bench --submit()--> line        |  Drafter: drafts continuously on draft_device
                    scheduler thread          |      ^  draft_tokens, NUM_DRAFTED, DRAFT_EPOCH
        cmd queues --StartRequest/Cancel/...> |      |
        out pipes  <--TokensOut/RequestDone/  |  SharedState (POSIX shm, random name,
        (one each)    WorkerFailed/WorkerReady|      |   created + unlinked here)
        CANCEL_REQUEST_ID, heartbeats ------> |      v  committed_tokens, NUM_COMMITTED, EPOCH
                                              | verify worker process: ar / sync / async verify

One request runs at a time, or with `max_num_seqs` > 1 up to that many in the verify worker's batch
(engine/batch_decode.py; async: the draft worker's too, one shared row each, engine/async_batch.py),
as their KV reservations fit its budget (engine/admission.py:
who waits, who runs, who starts next). The scheduler thread starts requests on the workers,
forwards their outputs to each request's callback, applies cancellation (one request: through
shared memory, so it takes effect before the next verify step; a batch: a CancelRequest message,
read before the next step), and watches the workers (engine/worker_recovery.py): a worker that
exits, reports an exception, or stops beating its heartbeat ends the running request(s) with an
error and is restarted (queued requests wait for the restart). A worker that cannot start
`max_restarts` times in a row marks the engine failed (every request then gets an error;
`fatal_error` says why).

    sup = EngineSupervisor(EngineConfig(verify_model="tiny-random/verify", draft_model="tiny-random/draft"))
    sup.start(); outs = sup.generate(GenerationRequest(1, [1, 2, 3])); sup.shutdown()
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue
import secrets
import threading

from engine.admission import Admission, OnOutput, OnStart, Waiting
from engine.config import EngineConfig
from engine.hardware import check_memory_ordering, has_ordered_stores
from engine.messages import (CancelRequest, EngineOutput, GenerationRequest, PassCosts, RequestDone, StartRequest,
                             TokensOut, WorkerFailed)
from engine.shared_state import SharedState, cancel_request
from engine.worker_handle import EngineStartError, WorkerHandle
from engine.worker_recovery import POLL_S, WorkerRecovery

logger = logging.getLogger("amusd.engine")


class EngineSupervisor(WorkerRecovery):
    def __init__(self, config: EngineConfig):
        self.requested_config, self.requested_mode = config, config.mode
        self.mode_reason = "set in the configuration"
        if config.mode == "auto" and not has_ordered_stores():
            self.requested_mode, self.mode_reason = "sync", "mode auto: async needs x86-64 store ordering"
            config = self._config_for("sync")
        self._decision = None                 # mode auto: an earlier start's choice (engine/mode_auto.py)
        if config.mode == "auto":
            from engine.mode_auto import load_decision
            self._decision = load_decision(config)
            config = self._config_for(self._decision["mode"] if self._decision else "async")
        self.config = config
        self._ctx = mp.get_context("spawn")
        self._workers = self._make_workers()
        self._state: SharedState | None = None
        self._line = Admission(config.max_model_len, config.max_queue_size)   # the one line (engine/admission.py)
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._is_restarting = False
        self._worker_request_ids = itertools.count(1)   # ids the workers see: never reused, always rising
        self._cancels_sent: set[int] = set()             # worker request ids (loop thread only)
        self.fatal_error: str | None = None
        self.tokenizer_dir = ""
        self.eos_token_ids: list[int] = []
        self.vocab_size = 0
        self.max_model_len = config.max_model_len

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        check_memory_ordering(self.config)
        for warning in self.config.warnings():
            logger.warning(warning)
        self._state = SharedState.create(self.config.max_model_len, self.config.num_shared_slots)
        try:
            self._spawn(list(self._workers.values()))
            self._await_ready(list(self._workers.values()))
            if self.requested_mode == "auto":
                self._settle_mode()
            self._send_pass_costs()
        except EngineStartError:
            self.shutdown()
            raise
        verify = self._workers["verify"].ready
        self.tokenizer_dir, self.eos_token_ids, self.vocab_size = verify.model_dir, verify.eos_token_ids, verify.vocab_size
        self._line.max_num_running = int(verify.runtime.get("max_num_seqs", 1))
        self._line.kv_budget_tokens = verify.runtime.get("kv_budget_tokens")
        self._thread = threading.Thread(target=self._loop, name="amusd-supervisor", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers, fail queued requests, free shared memory. Idempotent."""
        self._is_stopping = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)          # the loop cancels what runs (_send_cancels)
        for worker in self._workers.values():
            worker.stop(timeout_s)
        while (waiting := self._line.take()) is not None:
            waiting.on_output(EngineOutput(waiting.request.request_id, finished=True, finish_reason="error",
                                           error="engine shut down"))
        if self._state is not None:
            self._state.close()
            self._state = None
        is_thread_alive = self._thread is not None and self._thread.is_alive() \
            and self._thread is not threading.current_thread()
        if not is_thread_alive:            # the scheduler thread is the pipes' only other reader
            for worker in self._workers.values():
                worker.close_outputs()

    def _make_workers(self) -> dict[str, "WorkerHandle"]:
        roles = ["verify", "draft"] if self.config.uses_draft_worker else ["verify"]
        return {role: WorkerHandle(role) for role in roles}

    def _settle_mode(self) -> None:
        """`mode: auto`: reuse an earlier start's decision, or measure the async pair as each mode would
        run it (engine/mode_auto.py) and keep async or restart as ar / sync."""
        from engine.cost_model import choose_mode
        from engine.mode_auto import MeasureError, measure_mode_costs, save_decision
        decision, self._decision = self._decision, None
        if decision and decision["verify_costs_id"] == self._workers["verify"].ready.runtime.get("costs_id"):
            self.mode_reason = f"mode auto chose {decision['mode']} at an earlier start of this configuration: " \
                               f"{decision['reason']}{self._batching_note(decision['mode'])}"
            logger.info(self.mode_reason)
            return
        if self.config.mode != "async":
            self._restart_as("async")          # that decision is stale (other kernels, files, CPU): decide again
        try:
            costs = measure_mode_costs(self._workers, self.config, self._next_message)
        except MeasureError as exc:
            raise EngineStartError(str(exc)) from exc
        plan = choose_mode(costs, self.config.acceptance_prior, self.config.max_verify_tokens)
        self.mode_reason = f"mode auto chose {plan.mode}: {plan.reason}{self._batching_note(plan.mode)}"
        logger.info(self.mode_reason)
        if plan.mode != "async":
            self._restart_as(plan.mode)
        if costs.is_disturbed:                 # the next start measures and decides again
            self.mode_reason += " (measured while something else ran: not kept)"
            return
        verify_costs_id = self._workers["verify"].ready.runtime.get("costs_id")
        save_decision(self.requested_config, plan.mode, plan.reason, verify_costs_id)

    def _send_pass_costs(self) -> None:
        """Async batching: give the verify mode auto's measurements (cached after the first start), so
        that each pass can run wide, the draft paused, when speculation beside it would not pay."""
        if not self.config.is_async_batched:
            return
        from engine.mode_auto import MeasureError, measure_mode_costs
        try:
            costs = measure_mode_costs(self._workers, self.config, self._next_message)
        except MeasureError as exc:
            raise EngineStartError(str(exc)) from exc
        narrow, wide = costs.for_mode("async")[0], costs.verify_wide or costs.verify
        self._workers["verify"].cmd_queue.put(PassCosts(list(narrow.seconds), list(wide.seconds), list(costs.draft.seconds)))

    def _batching_note(self, mode: str) -> str:
        """Mode auto decides by one stream's speed; say so when async cannot batch here."""
        config = self._config_for(mode)
        if mode != "async" or self.requested_config.max_num_seqs <= 1 or config.is_async_batched:
            return ""
        return (f" (async decodes one request at a time here: {config.async_unbatched_reason}; "
                "set mode: ar to serve many users at once)")

    def _config_for(self, mode: str) -> EngineConfig:
        """The configuration run as `mode` (async: one request at a time where it cannot batch)."""
        config = self.requested_config.replace(mode=mode)
        return config if mode != "async" or config.is_async_batched else config.replace(max_num_seqs=1)

    def _restart_as(self, mode: str) -> None:
        for worker in self._workers.values():
            worker.stop(10.0)
            worker.close_outputs()
        self.config = self._config_for(mode)
        self._workers = self._make_workers()
        self._spawn(list(self._workers.values()))
        self._await_ready(list(self._workers.values()))

    # ---- public API --------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_output: OnOutput, on_start: OnStart | None = None) -> None:
        """Validate (ValueError), seed, and put the request in the engine's line (LineFull when
        max_queue_size already wait). Its outputs go to on_output, on the scheduler's thread (a
        waiting request that is cancelled is answered on the cancelling thread); on_start is called
        when it leaves the line for the workers."""
        request.params.validate()
        if not request.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(request.prompt_token_ids)} tokens; the model's context is {self.max_model_len}")
        self._line.check_fits(request)
        if request.params.temperature > 0 and request.params.seed is None:
            request.params.seed = secrets.randbits(62)     # draft and verify must share the noise
        if self._is_stopping or self.fatal_error:
            on_output(EngineOutput(request.request_id, finished=True, finish_reason="error",
                                   error=self.fatal_error or "engine is shutting down"))
            return
        self._line.put(request, on_output, on_start)

    def generate(self, request: GenerationRequest, timeout_s: float | None = None) -> list[EngineOutput]:
        """Blocking convenience: all outputs of one request (the last has finished=True)."""
        results: queue.Queue = queue.Queue()
        self.submit(request, results.put)
        outputs = []
        while True:
            out = results.get(timeout=timeout_s)
            outputs.append(out)
            if out.finished:
                return outputs

    def cancel(self, request_id: int) -> None:
        """Cancel a request: one waiting leaves the line and is answered now; one running alone
        stops before its next step, in a batch before the batch's next step."""
        waiting = self._line.drop(request_id)
        if waiting is not None:
            waiting.on_output(EngineOutput(request_id, finished=True, finish_reason="cancelled"))
            return
        with self._lock:
            self._cancelled.add(request_id)
        if self.max_num_running == 1:
            for wid, placed in list(self._line.running.items()):      # the loop's next pass does the rest
                if placed.request_id == request_id:
                    self._cancel_on_workers(wid)

    @property
    def max_num_running(self) -> int:
        """Requests decoded at once: the verify worker's batch (ar / sync with max_num_seqs), else 1."""
        return self._line.max_num_running

    @property
    def num_waiting(self) -> int:
        return self._line.num_waiting

    def is_healthy(self) -> bool:
        if self.fatal_error or self._is_restarting or self._state is None or self._is_stopping:
            return False
        return all(w.is_alive and self._heartbeat_age(w) < self.config.heartbeat_timeout_s for w in self._workers.values())

    def health(self) -> dict:
        return {
            "is_healthy": self.is_healthy(),
            "fatal_error": self.fatal_error,
            "mode": self.config.mode,
            "mode_reason": self.mode_reason,
            "kv_cache": self._line.kv_usage(),
            "workers": {w.role: {"is_alive": w.is_alive, "pid": w.pid,
                                 "num_restarts": w.num_restarts, "heartbeat_age_s": round(self._heartbeat_age(w), 3),
                                 **(w.ready.runtime if w.ready is not None else {})}
                        for w in self._workers.values()},
        }

    def worker_pids(self) -> dict[str, int | None]:
        return {w.role: w.pid for w in self._workers.values()}

    # ---- scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        while not self._is_stopping:
            if not self._line.wait_for_arrival(timeout_s=0.1) or (waiting := self._line.take()) is None:
                self._check_workers(None, [])
                continue
            rid, on_output = waiting.request.request_id, waiting.on_output
            if self._answer_if_cancelled(rid, on_output):
                continue
            if not self._ensure_workers() or self._is_stopping:
                error = self.fatal_error or "engine is shutting down"
                on_output(EngineOutput(rid, finished=True, finish_reason="error", error=error))
                continue
            self._run(waiting)

    def _answer_if_cancelled(self, rid: int, on_output) -> bool:
        """A request cancelled while it waited finishes as cancelled without reaching the workers."""
        with self._lock:
            is_cancelled = rid in self._cancelled
            self._cancelled.discard(rid)
        if is_cancelled:
            on_output(EngineOutput(rid, finished=True, finish_reason="cancelled"))
        return is_cancelled

    def _run(self, waiting: Waiting) -> None:
        """Decode until no request is running: up to max_num_running at once (ar's batch,
        engine/batch_decode.py), else one; queued requests start as places free up. A worker
        failure ends every running request with an error, then the workers restart."""
        self._start(waiting)
        while self._line.running:
            self._start_waiting()
            msg = self._next_message(POLL_S)
            wids = list(self._line.running)
            if isinstance(msg, WorkerFailed):
                self._fail_running(f"{msg.role} worker failed: {msg.error}")
                self._recover(self._workers[msg.role], wids)
                return
            if isinstance(msg, (TokensOut, RequestDone)) and msg.request_id in self._line.running:
                self._deliver(msg)
            self._send_cancels()
            if self._line.running and self._check_workers(self._fail_running, list(self._line.running)):
                return

    def _start(self, waiting: Waiting) -> None:
        """Workers see a fresh internal id (`wid`), whatever id the caller chose: the protocol
        compares ids for order and equality, so a caller's reused or smaller id must never reach them."""
        request = waiting.request
        if self._answer_if_cancelled(request.request_id, waiting.on_output):
            return
        wid = next(self._worker_request_ids)
        self._line.place(wid, waiting)
        start = StartRequest(wid, list(request.prompt_token_ids), request.params)
        for worker in self._workers.values():
            worker.cmd_queue.put(start)

    def _start_waiting(self) -> None:
        while not self._is_stopping and (item := self._line.take_startable(self._is_cancelled)) is not None:
            self._start(item)                    # (a cancelled one is answered there, not started)

    def _is_cancelled(self, rid: int) -> bool:
        with self._lock:
            return rid in self._cancelled

    def _deliver(self, msg: TokensOut | RequestDone) -> None:
        rid, on_output, _ = self._line.running[msg.request_id]
        if isinstance(msg, TokensOut):
            on_output(EngineOutput(rid, msg.token_ids, msg.logprobs, msg.prompt_logprobs))
            return
        self._line.remove(msg.request_id)
        self._cancels_sent.discard(msg.request_id)
        on_output(EngineOutput(rid, finished=True, finish_reason=msg.finish_reason, stats=msg.stats))
        with self._lock:
            self._cancelled.discard(rid)

    def _send_cancels(self) -> None:
        for wid, placed in list(self._line.running.items()):
            if wid not in self._cancels_sent and (placed.request_id in self._cancelled or self._is_stopping):
                self._cancel_on_workers(wid)
                self._cancels_sent.add(wid)

    def _cancel_on_workers(self, wid: int) -> None:
        """One request: through shared memory, read before its next step (also by the async draft).
        A batch: a CancelRequest message, read before the batch's next step."""
        if self.max_num_running > 1:
            self._workers["verify"].cmd_queue.put(CancelRequest(wid))
        elif self._state is not None:
            cancel_request(self._state, wid)

    def _fail_running(self, error: str) -> None:
        for wid, (rid, on_output, _) in list(self._line.running.items()):
            self._line.remove(wid)
            on_output(EngineOutput(rid, finished=True, finish_reason="error", error=error))
            with self._lock:
                self._cancelled.discard(rid)
        self._cancels_sent.clear()
