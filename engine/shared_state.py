"""The shared buffers that join the supervisor, the draft worker and the verify worker.

One POSIX shared-memory segment (`multiprocessing.shared_memory`, a unique random name, created
and unlinked by the supervisor) holds:

    ctrl[Ctrl.*]            int64 control fields (who writes which: see engine/async_decode.py)
    clock[Clock.*]          float64 heartbeats (time.monotonic(), system-wide on Linux)
    committed_tokens[L]     int64, written by the verify worker only
    draft_tokens[L]         int64, written by the draft worker only

This module is torch-free so the supervisor can create and inspect it. Workers get torch views
with `torch.from_numpy`. On CUDA the draft worker additionally shares a device copy of its
draft tokens with the verify worker through CUDA IPC (see engine/token_channel.py).
Plain stores to this memory are seen by other processes in program order on x86-64 (TSO);
that is the ordering the protocol relies on.
"""
from __future__ import annotations

import secrets
import time
from enum import IntEnum
from multiprocessing import shared_memory

import numpy as np


class Ctrl(IntEnum):
    REQUEST_ID = 0         # verify: request now running (0 = none)
    EPOCH = 1              # verify: bumped whenever the draft's tokens may disagree with the commit
    NUM_COMMITTED = 2      # verify: committed_tokens[:NUM_COMMITTED] are final (prompt + output)
    DRAFT_EPOCH = 3        # draft: the EPOCH its draft_tokens are consistent with
    NUM_DRAFTED = 4        # draft: draft_tokens[:NUM_DRAFTED] valid under DRAFT_EPOCH
    DRAFT_REQUEST_ID = 5   # draft: request it is working on (0 = idle)
    CANCEL_REQUEST_ID = 6  # supervisor: cancel this request
    LAST_FINISHED_REQUEST_ID = 7   # verify: most recent request it finished
    DRAFT_NUM_DRAFTED_TOTAL = 8    # draft: tokens drafted in the current request (stats)
    DRAFT_BUSY_US = 9              # draft: forward time in the current request, microseconds (stats)
    DRAFT_NUM_FORWARDS = 10        # draft: draft-model forwards in the current request (stats)
    DRAFT_NUM_DISCARDED = 11       # draft: drafted tokens thrown away on reconciliation (stats)
    NUM_FIELDS = 12


class Clock(IntEnum):
    VERIFY_HEARTBEAT = 0
    DRAFT_HEARTBEAT = 1
    NUM_FIELDS = 2


class SharedState:
    """Views over one shared-memory segment. `create` in the supervisor, `attach` in workers."""

    def __init__(self, shm: shared_memory.SharedMemory, max_len: int, is_owner: bool):
        self.shm = shm
        self.name = shm.name
        self.max_len = max_len
        self.is_owner = is_owner
        buf = shm.buf
        offset = 0
        self.ctrl = np.ndarray((Ctrl.NUM_FIELDS,), dtype=np.int64, buffer=buf, offset=offset)
        offset += 8 * Ctrl.NUM_FIELDS
        self.clock = np.ndarray((Clock.NUM_FIELDS,), dtype=np.float64, buffer=buf, offset=offset)
        offset += 8 * Clock.NUM_FIELDS
        self.committed_tokens = np.ndarray((max_len,), dtype=np.int64, buffer=buf, offset=offset)
        offset += 8 * max_len
        self.draft_tokens = np.ndarray((max_len,), dtype=np.int64, buffer=buf, offset=offset)

    @staticmethod
    def num_bytes(max_len: int) -> int:
        return 8 * (Ctrl.NUM_FIELDS + Clock.NUM_FIELDS + 2 * max_len)

    @classmethod
    def create(cls, max_len: int) -> "SharedState":
        name = f"amusd-{secrets.token_hex(6)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=cls.num_bytes(max_len))
        state = cls(shm, max_len, is_owner=True)
        state.ctrl[:] = 0
        state.clock[:] = time.monotonic()
        return state

    @classmethod
    def attach(cls, name: str, max_len: int) -> "SharedState":
        # track=False: the supervisor owns the segment; a worker must not unlink it on exit.
        shm = shared_memory.SharedMemory(name=name, create=False, track=False) \
            if _supports_track() else shared_memory.SharedMemory(name=name, create=False)
        return cls(shm, max_len, is_owner=False)

    def get(self, field: Ctrl) -> int:
        return int(self.ctrl[field])

    def set(self, field: Ctrl, value: int) -> None:
        self.ctrl[field] = value

    def beat(self, which: Clock) -> None:
        self.clock[which] = time.monotonic()

    def heartbeat_age(self, which: Clock) -> float:
        return time.monotonic() - float(self.clock[which])

    def close(self) -> None:
        # Drop numpy views first: SharedMemory.close() fails while exported buffers exist.
        self.ctrl = self.clock = self.committed_tokens = self.draft_tokens = None
        try:
            self.shm.close()
        except BufferError:
            pass
        if self.is_owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _supports_track() -> bool:
    import inspect
    return "track" in inspect.signature(shared_memory.SharedMemory.__init__).parameters


def release_draft(state: SharedState, request_id: int) -> None:
    """The supervisor's one write of verify-owned fields, made only once the verify process is dead
    (so there is still a single writer): end `request_id` as the verify would, freeing the draft."""
    state.set(Ctrl.REQUEST_ID, 0)
    state.set(Ctrl.LAST_FINISHED_REQUEST_ID, request_id)
