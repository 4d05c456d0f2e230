"""The supervisor's handle on one worker process: start it, ask it to stop, kill it, read what it sends.

Each worker sends on a pipe of its own, made anew at every spawn. A shared multiprocessing.Queue would
not survive `kill -9`: a writer killed while its feeder thread holds the queue's lock (or half-way
through a message) leaves the lock held and the stream cut, so the restarted worker's first message
never arrives. A dead worker's own pipe just reads as closed.

Torch-free: the worker imports torch in its own (spawned) process.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import time
from multiprocessing.connection import Connection

from engine.config import EngineConfig
from engine.messages import Shutdown, WorkerFailed, WorkerReady


class EngineStartError(RuntimeError):
    """The workers could not be started; the message says why."""


class WorkerHandle:
    def __init__(self, role: str):
        self.role = role
        self.process: mp.Process | None = None
        self.cmd_queue = None
        self.outputs: Connection | None = None           # read end of the worker's output pipe; None once closed
        self.num_restarts = 0
        self.ready: WorkerReady | None = None          # set when the worker reported it loaded

    @property
    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def spawn(self, ctx, config: EngineConfig, shm_name: str, peer_conn) -> None:
        from engine.worker import worker_main   # torch-free at import: torch loads in the child
        self.ready = None
        self._close_cmd_queue()
        self.close_outputs()
        self.cmd_queue = ctx.Queue()
        self.outputs, out_conn = ctx.Pipe(duplex=False)
        try:
            self.process = ctx.Process(target=worker_main, name=f"amusd-{self.role}", daemon=True,
                                       args=(self.role, config, shm_name, self.cmd_queue, out_conn, peer_conn,
                                             os.getpid()))
            self.process.start()
        finally:
            out_conn.close()      # the child holds its own copy: the pipe reads as closed when the child is gone

    def receive(self):
        """The worker's next message (call when `outputs` is readable); None once the pipe is closed."""
        try:
            return self.outputs.recv()
        except (EOFError, OSError):       # the worker exited, maybe mid-message: nothing more will come
            self.close_outputs()
            return None

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

    def close_outputs(self) -> None:
        """Close the read end of the output pipe (the caller is the only reader)."""
        if self.outputs is not None:
            self.outputs.close()
            self.outputs = None

    def _close_cmd_queue(self) -> None:
        """A restarted worker gets a new queue: the old one (and its pipe) must not leak."""
        if self.cmd_queue is not None:
            self.cmd_queue.close()
            self.cmd_queue.cancel_join_thread()
            self.cmd_queue = None


def receive_any(workers: list[WorkerHandle], timeout_s: float):
    """The next message from any of `workers`, or None if none came within `timeout_s`."""
    readers = {w.outputs: w for w in workers if w.outputs is not None}
    if not readers:
        time.sleep(timeout_s)
        return None
    for conn in multiprocessing.connection.wait(list(readers), timeout_s):
        msg = readers[conn].receive()
        if msg is not None:
            return msg
    return None


def await_ready(starting: list[WorkerHandle], workers: dict[str, WorkerHandle], timeout_s: float,
                should_abort) -> None:
    """Wait until every worker in `starting` sent WorkerReady (`workers`: all of them, by role)."""
    deadline = time.monotonic() + timeout_s
    while any(w.ready is None for w in starting):
        if should_abort():
            raise EngineStartError("engine is shutting down")
        if time.monotonic() > deadline:
            raise EngineStartError(f"workers not ready after {timeout_s:.0f}s")
        msg = receive_any(list(workers.values()), 0.1)
        if msg is None:
            for w in starting:
                if w.ready is None and not w.is_alive:
                    raise EngineStartError(f"{w.role} worker exited during start-up (exit code {w.process.exitcode})")
            continue
        if isinstance(msg, WorkerReady):
            workers[msg.role].ready = msg
        elif isinstance(msg, WorkerFailed):
            raise EngineStartError(f"{msg.role} worker failed to start: {msg.error}")
