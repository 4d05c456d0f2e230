"""How the draft worker's tokens (and q rows) reach the verify worker: always through host memory.

The verify needs every draft token on the host anyway (the accept comparison and the commit are
host control flow), so the shared segment in host memory is where tokens meet:

`HostDraftChannel` (CPU draft; also the verify's side of every channel): the draft stores each
token into `draft_tokens` in the shared segment, then bumps NUM_DRAFTED. One int store per token.
With rejection sampling the token's q row goes first into the shared [R, V] ring (row = position % R).

`CudaDraftChannel` (draft on cuda:N): the sampled token never makes the draft wait for its GPU. It
is copied (non-blocking, on the draft's stream) into a small pinned host ring, its q row likewise,
and a CUDA event is recorded after the copies. `flush()` (called every loop turn) moves the tokens
whose event has completed (`event.query()`, non-blocking) into the shared segment and only then
advances NUM_DRAFTED. The verify process never touches the draft's GPU: no CUDA context there
(which EXCLUSIVE_PROCESS compute mode and MIG forbid and which costs ~0.3-0.5 GB), no blocking
device reads. Cost per draft token: one 8-byte device-to-host copy and an event (plus 4 V bytes for
a q row when rejection sampling: ~0.6 MB for a 152k vocabulary, ~25 us over PCIe 4), all
overlapped with the draft's next forward; the token is visible to the verify one loop turn later.
A device-to-device (CUDA IPC, peer access) path would only pay for the q rows between two GPUs
with NVLink; it is not built. UNTESTED ON GPUs: the tests run this class on CPU tensors with
stand-in events (tests/test_token_channel.py).
"""
from __future__ import annotations

from collections import deque

import torch

from engine.shared_state import DraftSide, SharedState


class HostDraftChannel:
    def __init__(self, state: SharedState, draft_probs: torch.Tensor | None = None):
        self.draft_side = DraftSide(state)             # NUM_DRAFTED is the draft's to write
        self.host_tokens = state.draft_tokens          # numpy int64 view of the shared segment
        self.draft_probs = draft_probs                 # [R, V] shared ring of q rows (rejection only)

    def reset(self) -> None:
        """A new request starts: nothing of the last one may still be on its way."""

    def publish(self, position: int, token: torch.Tensor, q_row: torch.Tensor | None = None) -> int:
        """Write the draft token at `position` (after its q row); return it as a Python int."""
        if q_row is not None:
            self.draft_probs[position % self.draft_probs.shape[0]] = q_row
        value = int(token)
        self.host_tokens[position] = value
        self.draft_side.set_num_drafted(position + 1)    # after the token: readers see it complete
        return value

    def flush(self) -> None:
        pass

    def sync_host(self) -> None:
        """Make every published token visible in host_tokens (reconciliation reads them)."""

    def overwrite(self, start: int, values) -> None:
        """Reconciliation: replace tokens from `start` (NUM_DRAFTED is set by the caller after)."""
        self.host_tokens[start:start + len(values)] = values

    def read_for_verify(self, start: int, end: int) -> list[int]:
        return self.host_tokens[start:end].tolist()

    def q_rows_for_verify(self, start: int, end: int) -> torch.Tensor:
        """q rows [end - start, V] of draft positions start..end-1 (published, so complete)."""
        return self.draft_probs[[p % self.draft_probs.shape[0] for p in range(start, end)]]


class CudaDraftChannel(HostDraftChannel):
    """Draft side on a GPU: pinned staging ring + events; the shared segment stays the meeting point."""

    def __init__(self, state: SharedState, draft_probs: torch.Tensor | None, ring_size: int,
                 make_event=None, is_pinned: bool = True):
        super().__init__(state, draft_probs)
        self.ring_size = ring_size
        self.make_event = make_event or torch.cuda.Event
        self.staged_tokens = torch.zeros(ring_size, dtype=torch.long, pin_memory=is_pinned)     # [S]
        self.staged_q = None if draft_probs is None else \
            torch.zeros(ring_size, draft_probs.shape[1], dtype=draft_probs.dtype, pin_memory=is_pinned)  # [S, V]
        self.in_flight: deque[tuple[int, object]] = deque()       # (position, event), oldest first

    def reset(self) -> None:
        self.sync_host()

    def publish(self, position: int, token: torch.Tensor, q_row: torch.Tensor | None = None) -> int:
        if len(self.in_flight) >= self.ring_size:          # never overwrite a slot still in flight
            self.in_flight[0][1].synchronize()
            self.flush()
        slot = position % self.ring_size
        if q_row is not None:
            self.staged_q[slot].copy_(q_row, non_blocking=True)
        self.staged_tokens[slot].copy_(token.reshape(()), non_blocking=True)
        event = self.make_event()
        event.record()
        self.in_flight.append((position, event))
        self.flush()
        return -1   # the value is not on the host yet; the draft keeps using the device tensor

    def flush(self) -> None:
        while self.in_flight and self.in_flight[0][1].query():
            position, _ = self.in_flight.popleft()
            slot = position % self.ring_size
            if self.staged_q is not None:
                self.draft_probs[position % self.draft_probs.shape[0]] = self.staged_q[slot]
            self.host_tokens[position] = int(self.staged_tokens[slot])
            self.draft_side.set_num_drafted(position + 1)

    def sync_host(self) -> None:
        for _, event in self.in_flight:
            event.synchronize()
        self.flush()
