"""The CUDA draft's token channel, run on CPU tensors with stand-in CUDA events (issue 11, items 4-5).

What it must guarantee whatever the GPU does: NUM_DRAFTED never covers a token (or q row) whose
device-to-host copy has not completed, tokens become visible in order, a full staging ring waits
instead of overwriting a slot in flight, and a new request starts with nothing in flight.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.shared_state import Ctrl, SharedState  # noqa: E402
from engine.token_channel import CudaDraftChannel, HostDraftChannel  # noqa: E402

VOCAB = 6


class StandInEvent:
    """torch.cuda.Event's interface; the test decides when the copies it follows complete."""
    instances: list["StandInEvent"] = []

    def __init__(self):
        self.is_done = False
        self.num_waits = 0
        StandInEvent.instances.append(self)

    def record(self):
        pass

    def query(self) -> bool:
        return self.is_done

    def synchronize(self):
        self.num_waits += 1
        self.is_done = True


@pytest.fixture
def state():
    shared = SharedState.create(64)
    yield shared
    shared.close()


def _channel(state, ring_size=4, with_q=False):
    StandInEvent.instances = []
    ring = torch.zeros(3, VOCAB) if with_q else None
    return CudaDraftChannel(state, ring, ring_size, make_event=StandInEvent, is_pinned=False), ring


def test_tokens_become_visible_only_after_their_copy_and_in_order(state):
    channel, _ = _channel(state)
    for position, token in [(10, 5), (11, 6), (12, 7)]:
        assert channel.publish(position, torch.tensor(token)) == -1
    assert state.get(Ctrl.NUM_DRAFTED) == 0, "published before any copy completed"
    StandInEvent.instances[1].is_done = True        # the second copy finished first
    channel.flush()
    assert state.get(Ctrl.NUM_DRAFTED) == 0, "a later token overtook an earlier one"
    StandInEvent.instances[0].is_done = True
    channel.flush()
    assert state.get(Ctrl.NUM_DRAFTED) == 12 and list(state.draft_tokens[10:12]) == [5, 6]
    channel.sync_host()
    assert state.get(Ctrl.NUM_DRAFTED) == 13 and channel.read_for_verify(10, 13) == [5, 6, 7]


def test_q_rows_land_before_their_token_is_published(state):
    channel, ring = _channel(state, with_q=True)
    q = torch.softmax(torch.arange(VOCAB, dtype=torch.float32), 0)
    channel.publish(4, torch.tensor(2), q)
    assert torch.count_nonzero(ring) == 0 and state.get(Ctrl.NUM_DRAFTED) == 0
    StandInEvent.instances[0].is_done = True
    channel.flush()
    verify_side = HostDraftChannel(state, ring)
    assert state.get(Ctrl.NUM_DRAFTED) == 5
    assert torch.equal(verify_side.q_rows_for_verify(4, 5), q.view(1, -1))


def test_a_full_ring_waits_for_its_oldest_copy(state):
    channel, _ = _channel(state, ring_size=2)
    channel.publish(0, torch.tensor(1))
    channel.publish(1, torch.tensor(2))
    channel.publish(2, torch.tensor(3))             # slot 0 again: the copy of position 0 must be done
    assert StandInEvent.instances[0].num_waits == 1
    assert state.get(Ctrl.NUM_DRAFTED) == 1 and int(state.draft_tokens[0]) == 1


def test_reset_leaves_nothing_in_flight(state):
    channel, _ = _channel(state)
    channel.publish(0, torch.tensor(4))
    channel.reset()
    assert not channel.in_flight and state.get(Ctrl.NUM_DRAFTED) == 1
