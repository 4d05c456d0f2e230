"""The supervisor's process side: start workers, notice when one fails, restart it.

A mixin of EngineSupervisor (engine/supervisor.py), which owns the state it reads: `_workers`
(role -> WorkerHandle), `config`, `_state` (SharedState), `_ctx` (spawn context), `_thread`,
`_is_stopping`, `_is_restarting`, `fatal_error`. Torch-free.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from engine.messages import RequestDone, WorkerFailed
from engine.shared_state import HEARTBEAT_OF, release_draft
from engine.worker_handle import EngineStartError, WorkerHandle, await_ready, receive_any

POLL_S = 0.02
logger = logging.getLogger("amusd.engine")


class WorkerRecovery:
    def _check_workers(self, on_failure: Callable[[str], None] | None, wids: list[int]) -> bool:
        """Detect dead or hung workers; end the running requests (`wids`) with an error and restart them."""
        if self._is_stopping or self._state is None:
            return False
        for worker in self._workers.values():
            is_hung = self._heartbeat_age(worker) > self.config.heartbeat_timeout_s
            if worker.is_alive and not is_hung:
                continue
            reason = "stopped answering (heartbeat timeout)" if worker.is_alive else \
                f"died (exit code {worker.process.exitcode if worker.process else None})"
            logger.warning("%s worker %s during requests %s: restarting it", worker.role, reason, wids)
            if on_failure is not None:
                on_failure(f"{worker.role} worker {reason}")
            self._recover(worker, wids)
            return True
        return False

    def _recover(self, worker: WorkerHandle, wids: list[int]) -> None:
        """Kill the failed worker, end the requests it ran (`wids`) on the other, restart what must restart."""
        self._is_restarting = True
        try:
            worker.kill()
            if wids and self._workers["verify"].is_alive:     # the draft died: the verify ends its requests
                for wid in wids:
                    self._cancel_on_workers(wid)
                self._drain_until_done(set(wids))
            elif wids:
                release_draft(self._state, max(wids))       # the verify is dead: stand in for it
            self._ensure_workers()
        finally:
            self._is_restarting = False

    def _drain_until_done(self, wids: set[int]) -> None:
        deadline = time.monotonic() + self.config.step_timeout_s
        while wids and time.monotonic() < deadline:
            msg = self._next_message(POLL_S)
            if msg is None:
                if not self._workers["verify"].is_alive:
                    return
                continue
            if isinstance(msg, WorkerFailed):
                return
            if isinstance(msg, RequestDone):
                wids.discard(msg.request_id)

    def _ensure_workers(self) -> bool:
        """Restart dead workers (up to max_restarts consecutive failed starts).

        Workers that exchanged buffers at start-up (CUDA draft, rejection q ring) restart together
        on a fresh pipe: a survivor would hold the dead one's buffers, and a lone newcomer would
        wait for a handshake nobody sends.
        """
        if self.fatal_error:
            return False
        dead = self._workers_to_restart()
        if not dead:
            return True
        self._is_restarting = True
        last_error = ""
        try:
            for _ in range(self.config.max_restarts):
                for worker in dead:
                    worker.num_restarts += 1
                self._spawn(dead)
                try:
                    self._await_ready(dead)
                    self._send_pass_costs()
                    logger.info("restarted the %s worker(s)", " and ".join(w.role for w in dead))
                    return True
                except EngineStartError as exc:
                    last_error = str(exc)
                    logger.warning("restart failed: %s", last_error)
                    dead = self._workers_to_restart(also_unready=True)
            self.fatal_error = f"workers failed to restart {self.config.max_restarts} times: {last_error}"
            return False
        finally:
            self._is_restarting = False

    def _workers_to_restart(self, also_unready: bool = False) -> list[WorkerHandle]:
        dead = [w for w in self._workers.values() if not w.is_alive or (also_unready and w.ready is None)]
        if dead and self.config.has_peer_buffers:
            for worker in self._workers.values():
                worker.kill()
            return list(self._workers.values())
        for worker in dead:
            worker.kill()
        return dead

    # ---- process plumbing ---------------------------------------------------------------

    def _spawn(self, workers: list[WorkerHandle]) -> None:
        """Start `workers` joined by a fresh pipe (their start-up handshake); this process keeps no end."""
        verify_end, draft_end = self._ctx.Pipe()
        try:
            for worker in workers:
                self._state.clock[HEARTBEAT_OF[worker.role]] = time.monotonic()
                peer_end = {"verify": verify_end, "draft": draft_end}[worker.role]
                worker.spawn(self._ctx, self.config, self._state.name, peer_end)
        finally:
            verify_end.close()     # the children hold their own copies now
            draft_end.close()

    def _await_ready(self, workers: list[WorkerHandle]) -> None:
        await_ready(workers, self._workers, self.config.worker_start_timeout_s,
                    lambda: self._is_stopping and self._thread is not None)

    def _next_message(self, timeout_s: float):
        return receive_any(list(self._workers.values()), timeout_s)

    def _heartbeat_age(self, worker: WorkerHandle) -> float:
        if self._state is None or worker.ready is None:
            return 0.0
        return self._state.heartbeat_age(HEARTBEAT_OF[worker.role])
