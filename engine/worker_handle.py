"""The supervisor's handle on one worker process: start it, ask it to stop, kill it.

Torch-free: the worker imports torch in its own (spawned) process.
"""
from __future__ import annotations

import multiprocessing as mp
import os

from engine.config import EngineConfig
from engine.messages import Shutdown, WorkerReady


class WorkerHandle:
    def __init__(self, role: str):
        self.role = role
        self.process: mp.Process | None = None
        self.cmd_queue = None
        self.num_restarts = 0
        self.ready: WorkerReady | None = None          # set when the worker reported it loaded

    @property
    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def spawn(self, ctx, config: EngineConfig, shm_name: str, out_queue, peer_conn) -> None:
        from engine.worker import worker_main   # torch-free at import: torch loads in the child
        self.ready = None
        self._close_cmd_queue()
        self.cmd_queue = ctx.Queue()
        self.process = ctx.Process(target=worker_main, name=f"amusd-{self.role}", daemon=True,
                                   args=(self.role, config, shm_name, self.cmd_queue, out_queue, peer_conn,
                                         os.getpid()))
        self.process.start()

    def stop(self, timeout_s: float) -> None:
        """Ask for a clean exit, then kill whatever is left after `timeout_s`."""
        if self.process is None:
            return
        if self.is_alive:
            try:
                self.cmd_queue.put(Shutdown())
            except (ValueError, OSError):
                pass
            self.process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)

    def _close_cmd_queue(self) -> None:
        """A restarted worker gets a new queue: the old one (and its pipe) must not leak."""
        if self.cmd_queue is not None:
            self.cmd_queue.close()
            self.cmd_queue.cancel_join_thread()
            self.cmd_queue = None
