"""The shared buffers that join the supervisor, the draft worker and the verify worker.

One POSIX shared-memory segment (`multiprocessing.shared_memory`, a unique random name, created
and unlinked by the supervisor) holds, for each of `num_slots` sequences (one; `max_num_seqs` when
async batches, engine/async_batch.py), a row:

    ctrl[Ctrl.*]            int64 control fields (who writes which: see engine/async_decode.py)
    committed_tokens[L]     int64, written by the verify worker only
    draft_tokens[L]         int64, written by the draft worker only

and once: clock[Clock.*] (float64 heartbeats, time.monotonic(), system-wide on Linux) and
batch[Batch.*] (int64: the number of rows, written at creation; the verify's fields of async
batching, engine/async_batch.py).
`SharedState` itself reads and writes row 0 (one sequence at a time); `state.slots[i]` is row i.

This module is torch-free so the supervisor can create and inspect it. A CUDA draft worker moves
its tokens here through a pinned host ring (engine/token_channel.py): the verify never touches the
draft's GPU. `VerifySide` and `DraftSide` hold each worker's writes, in the protocol's order.
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


class Batch(IntEnum):
    LAST_PUBLISHED_REQUEST_ID = 0   # verify: the newest request it put in a row
    IS_DRAFT_PAUSED = 1             # verify: 1 while its passes run on the draft's cores too
    NUM_SLOTS = 2                   # supervisor, once at creation: rows in the segment
    NUM_FIELDS = 3


class Clock(IntEnum):
    VERIFY_HEARTBEAT = 0
    DRAFT_HEARTBEAT = 1
    NUM_FIELDS = 2


HEARTBEAT_OF = {"verify": Clock.VERIFY_HEARTBEAT, "draft": Clock.DRAFT_HEARTBEAT}    # by worker role


class SlotState:
    """One sequence's row: its control fields and token buffers (views into the segment)."""

    def __init__(self, ctrl: np.ndarray, committed_tokens: np.ndarray, draft_tokens: np.ndarray):
        self.ctrl, self.committed_tokens, self.draft_tokens = ctrl, committed_tokens, draft_tokens

    def get(self, field: Ctrl) -> int:
        return int(self.ctrl[field])

    def set(self, field: Ctrl, value: int) -> None:
        self.ctrl[field] = value


class SharedState:
    """Views over one shared-memory segment. `create` in the supervisor, `attach` in workers."""

    def __init__(self, shm: shared_memory.SharedMemory, max_len: int, is_owner: bool):
        self.shm = shm
        self.name = shm.name
        self.max_len = max_len
        self.is_owner = is_owner
        buf = shm.buf
        self.batch = np.ndarray((Batch.NUM_FIELDS,), dtype=np.int64, buffer=buf, offset=0)
        num_slots = int(self.batch[Batch.NUM_SLOTS])           # every process lays the rows out alike
        offset = 8 * Batch.NUM_FIELDS
        self.clock = np.ndarray((Clock.NUM_FIELDS,), dtype=np.float64, buffer=buf, offset=offset)
        offset += 8 * Clock.NUM_FIELDS
        ctrl = np.ndarray((num_slots, Ctrl.NUM_FIELDS), dtype=np.int64, buffer=buf, offset=offset)
        offset += 8 * num_slots * Ctrl.NUM_FIELDS
        committed = np.ndarray((num_slots, max_len), dtype=np.int64, buffer=buf, offset=offset)
        offset += 8 * num_slots * max_len
        drafts = np.ndarray((num_slots, max_len), dtype=np.int64, buffer=buf, offset=offset)
        self.slots = [SlotState(ctrl[i], committed[i], drafts[i]) for i in range(num_slots)]
        self.ctrl, self.committed_tokens, self.draft_tokens = ctrl[0], committed[0], drafts[0]   # row 0

    @staticmethod
    def num_bytes(max_len: int, num_slots: int = 1) -> int:
        return 8 * (Batch.NUM_FIELDS + Clock.NUM_FIELDS + num_slots * (Ctrl.NUM_FIELDS + 2 * max_len))

    @classmethod
    def create(cls, max_len: int, num_slots: int = 1) -> "SharedState":
        name = f"amusd-{secrets.token_hex(6)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=cls.num_bytes(max_len, num_slots))
        header = np.ndarray((Batch.NUM_FIELDS,), dtype=np.int64, buffer=shm.buf, offset=0)
        header[:] = 0
        header[Batch.NUM_SLOTS] = num_slots
        del header                                             # (close() fails while views exist)
        state = cls(shm, max_len, is_owner=True)
        for slot in state.slots:
            slot.ctrl[:] = 0
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
        self.ctrl = self.clock = self.committed_tokens = self.draft_tokens = self.batch = None
        self.slots = []
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


class VerifySide:
    """The verify worker's view: its writes, each group in the protocol's order (engine/async_decode.py)."""

    def __init__(self, state: SharedState):
        self.state = state
        self.epoch = state.get(Ctrl.EPOCH)

    def start_request(self, request_id: int, prompt_ids: list[int]) -> None:
        """Prompt -> NUM_COMMITTED -> a fresh EPOCH -> REQUEST_ID (the draft may start now)."""
        self.commit(0, prompt_ids)
        self.invalidate_draft()
        self.state.set(Ctrl.REQUEST_ID, request_id)

    def commit(self, start: int, token_ids: list[int]) -> None:
        """committed_tokens[start:...] = token_ids, then NUM_COMMITTED: readers never see a hole."""
        self.state.committed_tokens[start:start + len(token_ids)] = token_ids
        self.state.set(Ctrl.NUM_COMMITTED, start + len(token_ids))

    def invalidate_draft(self) -> None:
        """Bump EPOCH: the draft's tokens may disagree with the commit until it reconciles."""
        self.epoch += 1
        self.state.set(Ctrl.EPOCH, self.epoch)

    def num_drafted(self) -> int:
        """NUM_DRAFTED whatever the draft's epoch (stats only: the tokens may be stale)."""
        return self.state.get(Ctrl.NUM_DRAFTED)

    def num_consistent_drafted(self) -> int:
        """NUM_DRAFTED if the draft has reconciled with the current EPOCH (its tokens are usable), else 0."""
        return self.state.get(Ctrl.NUM_DRAFTED) if self.state.get(Ctrl.DRAFT_EPOCH) == self.epoch else 0

    def finish_request(self, request_id: int) -> None:
        """REQUEST_ID = 0 before LAST_FINISHED_REQUEST_ID (the draft leaves on either)."""
        self.state.set(Ctrl.REQUEST_ID, 0)
        self.state.set(Ctrl.LAST_FINISHED_REQUEST_ID, request_id)

    def is_cancelled(self, request_id: int) -> bool:
        return self.state.get(Ctrl.CANCEL_REQUEST_ID) == request_id

    def draft_stats(self) -> dict[str, int]:
        return {"num_drafted_total": self.state.get(Ctrl.DRAFT_NUM_DRAFTED_TOTAL),
                "num_discarded": self.state.get(Ctrl.DRAFT_NUM_DISCARDED),
                "busy_us": self.state.get(Ctrl.DRAFT_BUSY_US),
                "num_forwards": self.state.get(Ctrl.DRAFT_NUM_FORWARDS)}


class DraftSide:
    """The draft worker's view: its writes, each group in the protocol's order."""

    def __init__(self, state: SharedState):
        self.state = state

    def epoch_while_running(self, request_id: int) -> int | None:
        """EPOCH, if request_id is still running; None once it is not.

        EPOCH is read first: the verify ends a request (REQUEST_ID = 0) before it bumps EPOCH for
        the next, so an epoch read before seeing REQUEST_ID == request_id belongs to that request.
        """
        epoch = self.state.get(Ctrl.EPOCH)
        return epoch if self.state.get(Ctrl.REQUEST_ID) == request_id else None

    def is_started(self, request_id: int) -> bool | None:
        """True once the verify published request_id, False if it already finished it, None: not yet."""
        if self.state.get(Ctrl.REQUEST_ID) == request_id:
            return True
        return False if self.state.get(Ctrl.LAST_FINISHED_REQUEST_ID) >= request_id else None

    def num_committed(self) -> int:
        return self.state.get(Ctrl.NUM_COMMITTED)

    def set_num_drafted(self, num_drafted: int) -> None:
        """After draft_tokens[:num_drafted] hold their values."""
        self.state.set(Ctrl.NUM_DRAFTED, num_drafted)

    def adopt(self, epoch: int, num_drafted: int) -> None:
        """After reconciling with the commit read under `epoch`: NUM_DRAFTED, then DRAFT_EPOCH."""
        self.state.set(Ctrl.NUM_DRAFTED, num_drafted)
        self.state.set(Ctrl.DRAFT_EPOCH, epoch)

    def record_stats(self, num_drafted_total: int, num_discarded: int, busy_s: float, num_forwards: int) -> None:
        self.state.set(Ctrl.DRAFT_NUM_DRAFTED_TOTAL, num_drafted_total)
        self.state.set(Ctrl.DRAFT_NUM_DISCARDED, num_discarded)
        self.state.set(Ctrl.DRAFT_BUSY_US, int(busy_s * 1e6))
        self.state.set(Ctrl.DRAFT_NUM_FORWARDS, num_forwards)


def publish_started(state: SharedState, request_id: int) -> None:
    """Verify, async batching: after a row's REQUEST_ID = request_id (VerifySide.start_request), so a
    draft that reads this first and then finds the request in no row knows it has already finished."""
    state.batch[Batch.LAST_PUBLISHED_REQUEST_ID] = request_id


def newest_started(state: SharedState) -> int:
    return int(state.batch[Batch.LAST_PUBLISHED_REQUEST_ID])


def pause_draft(state: SharedState, is_paused: bool) -> None:
    """Verify, async batching: the draft stops drafting (1) before the verify widens onto its cores,
    and may start again (0) after the verify is back on its own."""
    state.batch[Batch.IS_DRAFT_PAUSED] = int(is_paused)


def is_draft_paused(state: SharedState) -> bool:
    return bool(state.batch[Batch.IS_DRAFT_PAUSED])


def cancel_request(state: SharedState, request_id: int) -> None:
    """The supervisor's field: the verify checks it before every step."""
    state.set(Ctrl.CANCEL_REQUEST_ID, request_id)


def release_draft(state: SharedState, newest_request_id: int) -> None:
    """The supervisor's one write of verify-owned fields, made only once the verify process is dead
    (so there is still a single writer): end every request up to `newest_request_id` (the newest
    sent to the workers) in every row as the verify would, freeing the draft."""
    for slot in state.slots:
        slot.set(Ctrl.REQUEST_ID, 0)
        slot.set(Ctrl.LAST_FINISHED_REQUEST_ID, newest_request_id)
    state.batch[Batch.LAST_PUBLISHED_REQUEST_ID] = newest_request_id
    state.batch[Batch.IS_DRAFT_PAUSED] = 0
