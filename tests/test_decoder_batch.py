"""engine/decoder.py, LeanDecoder.forward_batch: several sequences in one pass (issue #10's kernel layer).

Batch invariance: a sequence's hidden states must not depend on what else is in the pass. Each
sequence's schedule (prompt in chunks, decode steps of 1..5 tokens, rollbacks) runs once packed with
whichever other sequences are active at that step (sequences join and leave mid-flight, a long prompt's
chunks share passes with other sequences' decode steps, one slot grows past its first capacity), and
once alone; every step's hidden states must agree.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.decoder import MIN_KV_CAPACITY, LeanDecoder
from engine.models import load_causal_lm
from engine.tiny_models import ensure_tiny_model

PROMPT_LENGTHS = [3, 40, 1, MIN_KV_CAPACITY + 60, 17]     # the long one grows its slot mid-batch
CHUNK = 64
NUM_STEPS = 14


def _schedule(vocab: int, seed: int) -> list[list[tuple]]:
    """Per sequence, its operations by step: ("feed", ids) or ("crop", n); a sequence joins at step
    2*i and leaves after its last operation."""
    rng = random.Random(seed)
    schedules = []
    for i, length in enumerate(PROMPT_LENGTHS):
        prompt = [rng.randrange(vocab) for _ in range(length)]
        ops: list[tuple] = [None] * (2 * i)                       # not yet joined
        ops += [("feed", prompt[start:start + CHUNK]) for start in range(0, length, CHUNK)]
        num_cached = length
        for _ in range(NUM_STEPS - 2 * i):
            if rng.random() < 0.25 and num_cached > 2:
                num_cached -= rng.randrange(1, 3)
                ops.append(("crop", num_cached))                   # a rejected verify rolls back
            width = rng.randrange(1, 6)
            ops.append(("feed", [rng.randrange(vocab) for _ in range(width)]))
            num_cached += width
        schedules.append(ops)
    return schedules


def _run(decoder: LeanDecoder, schedules: list[list[tuple]], is_batched: bool) -> dict:
    """Hidden states by (sequence, step): all active sequences in one pass per step, or one by one."""
    slots = [decoder.new_slot() for _ in schedules]
    hidden_by_step = {}
    for step in range(max(len(ops) for ops in schedules)):
        rows, owners = [], []
        for seq, ops in enumerate(schedules):
            op = ops[step] if step < len(ops) else None
            if op is None:
                continue
            if op[0] == "crop":
                slots[seq].num_cached = min(slots[seq].num_cached, op[1])
                continue
            rows.append((slots[seq], torch.tensor(op[1], dtype=torch.long)))
            owners.append(seq)
        passes = [rows] if is_batched else [[row] for row in rows]
        hidden = torch.cat([decoder.forward_batch(p) for p in passes if p]) if rows else None
        offset = 0
        for seq, (_, ids) in zip(owners, rows):
            hidden_by_step[seq, step] = hidden[offset:offset + len(ids)]
            offset += len(ids)
    return hidden_by_step


@pytest.mark.parametrize("dtype, quantization", [("float64", "none"), ("float32", "int8"), ("float32", "int4")])
def test_a_sequence_gets_the_same_hidden_states_whatever_shares_its_pass(session_cache_dir, dtype, quantization):
    path = ensure_tiny_model("tiny-random/verify", session_cache_dir)
    model = load_causal_lm(path, None, "cpu", dtype, quantization)
    decoder = LeanDecoder(model)
    schedules = _schedule(model.config.vocab_size, seed=3)
    alone, batched = _run(decoder, schedules, is_batched=False), _run(decoder, schedules, is_batched=True)
    assert alone.keys() == batched.keys()
    num_shared = sum(1 for step in range(NUM_STEPS + 8)
                     if sum((seq, step) in batched for seq in range(len(schedules))) > 1)
    assert num_shared >= 8, "the schedule must pack several sequences into most passes"
    tolerance = 1e-9 if dtype == "float64" else 1e-4
    for key, expected in alone.items():
        got = batched[key]
        assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance), \
            f"sequence {key[0]} step {key[1]}: differs by {(got - expected).abs().max().item()} when batched"
        logits_alone, logits_batched = model.lm_head(expected), model.lm_head(got)
        assert torch.equal(logits_alone.argmax(-1), logits_batched.argmax(-1))


def test_a_single_row_batch_is_the_one_sequence_forward(session_cache_dir):
    """forward(ids) on the decoder's own slot is forward_batch with that one row, bit for bit."""
    path = ensure_tiny_model("tiny-random/verify", session_cache_dir)
    model = load_causal_lm(path, None, "cpu", "float32", "none")
    decoder = LeanDecoder(model)
    other = decoder.new_slot()
    ids = torch.arange(1, 30).view(1, -1)
    a = decoder.forward(ids)
    b = decoder.forward_batch([(other, ids[0])])
    assert torch.equal(a, b) and decoder.num_cached == other.num_cached == 29
