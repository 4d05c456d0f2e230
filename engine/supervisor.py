"""Engine supervisor: owns the worker processes, the shared buffers and the request FIFO.

Process topology (the supervisor lives in the frontend process; torch is imported only by workers):

    frontend process                         | draft worker process (async only)
    ------------------------------------------|-----------------------------------------
    FastAPI / bench --submit()--> FIFO        |  Drafter: drafts continuously on draft_device
                    scheduler thread          |      ^  draft_tokens, NUM_DRAFTED, DRAFT_EPOCH
        cmd queues --StartRequest/Cancel/...> |      |
        out pipes  <--TokensOut/RequestDone/  |  SharedState (POSIX shm, random name,
        (one each)    WorkerFailed/WorkerReady|      |   created + unlinked here)
        CANCEL_REQUEST_ID, heartbeats ------> |      v  committed_tokens, NUM_COMMITTED, EPOCH
                                              | verify worker process: ar / sync / async verify

One request runs at a time, or in `ar` with `max_num_seqs` > 1 up to that many in the verify
worker's batch (engine/batch_decode.py). The scheduler thread starts requests on the workers,
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
from typing import Callable

from engine.config import EngineConfig
from engine.hardware import check_memory_ordering, has_ordered_stores
from engine.messages import (CancelRequest, EngineOutput, GenerationRequest, RequestDone, StartRequest, TokensOut,
                             WorkerFailed)
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
        self._fifo: queue.Queue = queue.Queue()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._is_restarting = False
        self._worker_request_ids = itertools.count(1)   # ids the workers see: never reused, always rising
        self._running: tuple[int, int] | None = None     # (caller's request id, worker request id)
        self.fatal_error: str | None = None
        self.tokenizer_dir = ""
        self.eos_token_ids: list[int] = []
        self.vocab_size = 0
        self.max_model_len = config.max_model_len
        self.max_num_running = 1              # requests decoded at once: the verify worker's batch (ar), else 1

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        check_memory_ordering(self.config)
        for warning in self.config.warnings():
            logger.warning(warning)
        self._state = SharedState.create(self.config.max_model_len)
        try:
            self._spawn(list(self._workers.values()))
            self._await_ready(list(self._workers.values()))
            if self.requested_mode == "auto":
                self._settle_mode()
        except EngineStartError:
            self.shutdown()
            raise
        verify = self._workers["verify"].ready
        self.tokenizer_dir, self.eos_token_ids, self.vocab_size = verify.model_dir, verify.eos_token_ids, verify.vocab_size
        self.max_num_running = int(verify.runtime.get("max_num_seqs", 1))
        self._thread = threading.Thread(target=self._loop, name="amusd-supervisor", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers, fail queued requests, free shared memory. Idempotent."""
        self._is_stopping = True
        if self._thread is not None and self._thread is not threading.current_thread():
            running = self._running
            if running is not None and self._state is not None:
                cancel_request(self._state, running[1])
            self._thread.join(timeout_s)
        for worker in self._workers.values():
            worker.stop(timeout_s)
        while True:
            try:
                request, on_output = self._fifo.get_nowait()
            except queue.Empty:
                break
            on_output(EngineOutput(request.request_id, finished=True, finish_reason="error", error="engine shut down"))
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
                               f"{decision['reason']}"
            logger.info(self.mode_reason)
            return
        if self.config.mode != "async":
            self._restart_as("async")          # that decision is stale (other kernels, files, CPU): decide again
        try:
            costs = measure_mode_costs(self._workers, self.config, self._next_message)
        except MeasureError as exc:
            raise EngineStartError(str(exc)) from exc
        plan = choose_mode(costs, self.config.acceptance_prior, self.config.max_verify_tokens)
        self.mode_reason = f"mode auto chose {plan.mode}: {plan.reason}"
        logger.info(self.mode_reason)
        if plan.mode != "async":
            self._restart_as(plan.mode)
        verify_costs_id = self._workers["verify"].ready.runtime.get("costs_id")
        save_decision(self.requested_config, plan.mode, plan.reason, verify_costs_id)

    def _config_for(self, mode: str) -> EngineConfig:
        """The configuration run as `mode` (max_num_seqs batches ar only)."""
        batch = self.requested_config.max_num_seqs if mode == "ar" else 1
        return self.requested_config.replace(mode=mode, max_num_seqs=batch)

    def _restart_as(self, mode: str) -> None:
        for worker in self._workers.values():
            worker.stop(10.0)
            worker.close_outputs()
        self.config = self._config_for(mode)
        self._workers = self._make_workers()
        self._spawn(list(self._workers.values()))
        self._await_ready(list(self._workers.values()))

    # ---- public API --------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_output: Callable[[EngineOutput], None]) -> None:
        request.params.validate()
        if not request.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(request.prompt_token_ids)} tokens; the model's context is {self.max_model_len}")
        if request.params.temperature > 0 and request.params.seed is None:
            request.params.seed = secrets.randbits(62)     # draft and verify must share the noise
        if self._is_stopping or self.fatal_error:
            on_output(EngineOutput(request.request_id, finished=True, finish_reason="error",
                                   error=self.fatal_error or "engine is shutting down"))
            return
        self._fifo.put((request, on_output))

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
        with self._lock:
            self._cancelled.add(request_id)
        running = self._running          # one read: the pair cannot belong to two requests
        if running is not None and running[0] == request_id and self._state is not None:
            cancel_request(self._state, running[1])

    @property
    def running_request_id(self) -> int | None:
        """The caller's id of the request the workers are decoding now."""
        running = self._running
        return running[0] if running is not None else None

    @property
    def num_waiting(self) -> int:
        return self._fifo.qsize()


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
            try:
                request, on_output = self._fifo.get(timeout=0.1)
            except queue.Empty:
                self._check_workers(None, None)
                continue
            rid = request.request_id
            if self._answer_if_cancelled(rid, on_output):
                continue
            if not self._ensure_workers() or self._is_stopping:
                error = self.fatal_error or "engine is shutting down"
                on_output(EngineOutput(rid, finished=True, finish_reason="error", error=error))
                continue
            if self.max_num_running > 1:
                self._run_batch(request, on_output)
            else:
                self._run(request, on_output)

    def _answer_if_cancelled(self, rid: int, on_output) -> bool:
        """A request cancelled while it waited finishes as cancelled without reaching the workers."""
        with self._lock:
            is_cancelled = rid in self._cancelled
            self._cancelled.discard(rid)
        if is_cancelled:
            on_output(EngineOutput(rid, finished=True, finish_reason="cancelled"))
        return is_cancelled

    def _run(self, request: GenerationRequest, on_output) -> None:
        """Decode one request. Workers see a fresh internal id (`wid`), whatever id the caller chose:
        the protocol compares ids for order and equality, so a caller's reused or smaller id must
        never reach them."""
        rid = request.request_id
        wid = next(self._worker_request_ids)
        self._running = (rid, wid)
        start = StartRequest(wid, list(request.prompt_token_ids), request.params)
        for worker in self._workers.values():
            worker.cmd_queue.put(start)
        is_cancel_sent = False
        try:
            while True:
                if not is_cancel_sent and (rid in self._cancelled or self._is_stopping):
                    cancel_request(self._state, wid)
                    is_cancel_sent = True
                msg = self._next_message(POLL_S)
                if isinstance(msg, TokensOut) and msg.request_id == wid:
                    on_output(EngineOutput(rid, msg.token_ids, msg.logprobs, msg.prompt_logprobs))
                elif isinstance(msg, RequestDone) and msg.request_id == wid:
                    on_output(EngineOutput(rid, finished=True, finish_reason=msg.finish_reason, stats=msg.stats))
                    return
                elif isinstance(msg, WorkerFailed):
                    on_output(EngineOutput(rid, finished=True, finish_reason="error",
                                           error=f"{msg.role} worker failed: {msg.error}"))
                    self._recover(self._workers[msg.role], wid)
                    return
                if self._check_workers(lambda error: on_output(EngineOutput(rid, finished=True, finish_reason="error",
                                                                            error=error)), wid):
                    return
        finally:
            self._running = None
            with self._lock:
                self._cancelled.discard(rid)

    def _run_batch(self, request: GenerationRequest, on_output) -> None:
        """`ar` with batching (engine/batch_decode.py): keep up to max_num_running requests on the verify
        worker, start queued ones as places free up, until none is left. Cancels go by message; a
        worker failure ends every running request with an error."""
        running: dict[int, tuple[int, Callable]] = {}          # worker request id -> (caller's id, on_output)
        is_cancel_sent: set[int] = set()

        def fail_all(error: str) -> None:
            for rid, callback in running.values():
                callback(EngineOutput(rid, finished=True, finish_reason="error", error=error))

        self._start_in_batch(request, on_output, running)
        while running:
            while len(running) < self.max_num_running and not self._is_stopping:
                try:
                    self._start_in_batch(*self._fifo.get_nowait(), running)
                except queue.Empty:
                    break
            msg = self._next_message(POLL_S)
            if isinstance(msg, TokensOut) and msg.request_id in running:
                rid, callback = running[msg.request_id]
                callback(EngineOutput(rid, msg.token_ids, msg.logprobs, msg.prompt_logprobs))
            elif isinstance(msg, RequestDone) and msg.request_id in running:
                rid, callback = running.pop(msg.request_id)
                callback(EngineOutput(rid, finished=True, finish_reason=msg.finish_reason, stats=msg.stats))
                with self._lock:
                    self._cancelled.discard(rid)
            elif isinstance(msg, WorkerFailed):
                fail_all(f"{msg.role} worker failed: {msg.error}")
                self._recover(self._workers[msg.role], None)
                return
            for wid, (rid, _) in running.items():
                if wid not in is_cancel_sent and (rid in self._cancelled or self._is_stopping):
                    self._workers["verify"].cmd_queue.put(CancelRequest(wid))
                    is_cancel_sent.add(wid)
            if running and self._check_workers(fail_all, None):
                return

    def _start_in_batch(self, request: GenerationRequest, on_output, running: dict) -> None:
        rid = request.request_id
        if self._answer_if_cancelled(rid, on_output):
            return
        wid = next(self._worker_request_ids)
        running[wid] = (rid, on_output)
        self._workers["verify"].cmd_queue.put(StartRequest(wid, list(request.prompt_token_ids), request.params))
