"""How the draft worker's tokens reach the verify worker: host shared memory or CUDA IPC.

`HostDraftChannel` (CPU devices): the draft writes each token into `draft_tokens` in the shared
segment, then bumps NUM_DRAFTED. One int store per token, no copies of the whole output.

`CudaDraftChannel` (draft on cuda:N): the draft's sampled token never leaves the GPU on the hot
path. It is copied (asynchronously, on the draft's stream) into a device buffer that the verify
worker maps through CUDA IPC; a CUDA event is recorded after each copy and NUM_DRAFTED is only
advanced for tokens whose event has completed (`event.query()`, non-blocking). So the draft never
synchronises its device per token; the verify reads the tokens device-to-device.
UNTESTED ON GPUs (none exist where this was built); the CPU channel is what the tests exercise.
"""
from __future__ import annotations

import torch

from engine.shared_state import Ctrl, SharedState


class HostDraftChannel:
    def __init__(self, state: SharedState):
        self.state = state
        self.host_tokens = state.draft_tokens          # numpy int64 view of the shared segment

    def publish(self, position: int, token: torch.Tensor) -> int:
        """Write the draft token at `position`; return it as a Python int."""
        value = int(token)
        self.host_tokens[position] = value
        self.state.set(Ctrl.NUM_DRAFTED, position + 1)   # after the token: readers see it complete
        return value

    def flush(self) -> None:
        pass

    def sync_host(self, end: int) -> None:
        pass

    def overwrite(self, start: int, values) -> None:
        """Reconciliation: replace tokens from `start` (NUM_DRAFTED is set by the caller after)."""
        self.host_tokens[start:start + len(values)] = values

    def read_for_verify(self, start: int, end: int) -> list[int]:
        return self.host_tokens[start:end].tolist()

    def token_at(self, position: int) -> int:
        return int(self.host_tokens[position])


class CudaDraftChannel(HostDraftChannel):
    """Draft side holds `device_tokens` (its own GPU); the verify side receives it via IPC."""

    def __init__(self, state: SharedState, device_tokens: torch.Tensor):
        super().__init__(state)
        self.device_tokens = device_tokens             # int64 [max_len] on the draft's GPU
        self._pending: list[tuple[int, torch.cuda.Event]] = []

    def publish(self, position: int, token: torch.Tensor) -> int:
        self.device_tokens[position].copy_(token.reshape(()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((position, event))
        self.flush()
        return -1   # value unknown on the host without a sync; fetched lazily on reconcile

    def flush(self) -> None:
        num_done = 0
        for position, event in self._pending:
            if not event.query():
                break
            num_done += 1
            self.state.set(Ctrl.NUM_DRAFTED, position + 1)
        del self._pending[:num_done]

    def sync_host(self, end: int) -> None:
        """Bring host_tokens[:end] up to date (one device sync; only on reconciliation)."""
        torch.cuda.current_stream(self.device_tokens.device).synchronize()
        self._pending.clear()
        self.host_tokens[:end] = self.device_tokens[:end].cpu().numpy()

    def overwrite(self, start: int, values) -> None:
        super().overwrite(start, values)
        self.device_tokens[start:start + len(values)] = torch.as_tensor(values, device=self.device_tokens.device)
        torch.cuda.current_stream(self.device_tokens.device).synchronize()

    def read_for_verify(self, start: int, end: int) -> list[int]:
        # Verify side: peer copy from the draft's GPU, then to host for the accept comparison.
        return self.device_tokens[start:end].tolist()

    def token_at(self, position: int) -> int:
        return int(self.device_tokens[position])
