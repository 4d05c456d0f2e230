"""The CUDA path, on real GPUs: `pytest -m cuda` (each test skips without the GPUs it needs).

Not run where this project is built (no GPU there); see the README's "what was and was not run".
Covers the draft's pinned-ring token channel with real events, both placements (draft cuda:0 +
verify cuda:1; CPU draft + GPU verify), kill -9 of each worker on a GPU, and greedy identity to
`ar` in float32, where a difference is accepted only at a near-tie of the verify's top two logits
(different kernels run for k-token and 1-token forwards, so bit-identity cannot hold on GPUs).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

torch = pytest.importorskip("torch")

from engine.messages import GenerationRequest, SamplingParams  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
    assert_same_or_near_tie, random_prompts, run, start_engine, tiny_config)

pytestmark = pytest.mark.cuda
NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
PROMPTS = random_prompts(6, seed=21)
MAX_TOKENS = 48
NEAR_TIE = 1e-3          # float32 logits of a k-token vs 1-token forward differ by ~1e-5 here


def needs_gpus(count: int):
    return pytest.mark.skipif(NUM_GPUS < count, reason=f"needs {count} CUDA device(s), found {NUM_GPUS}")


PLACEMENTS = {
    "draft-cuda0-verify-cuda1": pytest.param(dict(draft_device="cuda:0", verify_device="cuda:1"),
                                             marks=needs_gpus(2)),
    "draft-cpu-verify-cuda0": pytest.param(dict(draft_device="cpu", verify_device="cuda:0"), marks=needs_gpus(1)),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@needs_gpus(1)
def test_pinned_ring_channel_with_real_events():
    from engine.shared_state import Ctrl, SharedState
    from engine.token_channel import CudaDraftChannel
    state = SharedState.create(64)
    try:
        ring = torch.zeros(3, 8)
        channel = CudaDraftChannel(state, ring, ring_size=4)
        tokens = torch.arange(100, 110, device="cuda:0")
        q = torch.softmax(torch.randn(10, 8, device="cuda:0"), -1)
        for i in range(10):
            channel.publish(i, tokens[i], q[i])
            assert state.get(Ctrl.NUM_DRAFTED) <= i + 1
        channel.sync_host()
        assert state.get(Ctrl.NUM_DRAFTED) == 10 and channel.read_for_verify(0, 10) == list(range(100, 110))
        assert torch.allclose(ring[9 % 3], q[9].cpu())
    finally:
        state.close()


def _gap_at(cache_dir: str, prefix: list[int]) -> float:
    """Top-1 minus top-2 logit of the verify model after `prefix` (float64 on CPU, no cache)."""
    from engine.models import load_causal_lm, resolve_model_spec
    path, _ = resolve_model_spec("tiny-random/verify", cache_dir)
    model = load_causal_lm(path, None, "cpu", "float64")
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("placement", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
def test_greedy_equals_ar_up_to_near_ties(cache_dir, placement):
    ar = start_engine(tiny_config(cache_dir, "ar", dtype="float32", verify_device=placement["verify_device"]))
    spec = start_engine(tiny_config(cache_dir, "async", dtype="float32", **placement))
    try:
        num_accepted = 0
        for prompt in PROMPTS:
            expected, _ = run(ar, prompt, max_tokens=MAX_TOKENS)
            tokens, final = run(spec, prompt, max_tokens=MAX_TOKENS)
            num_accepted += final.stats.num_accepted_tokens
            assert_same_or_near_tie(prompt, expected, tokens, lambda context: _gap_at(cache_dir, context), NEAR_TIE)
        assert num_accepted > 0
    finally:
        ar.shutdown()
        spec.shutdown()


@pytest.mark.parametrize("role", ["draft", "verify"])
@pytest.mark.parametrize("placement", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
def test_kill_each_worker_on_gpu_then_recover(cache_dir, placement, role):
    sup = start_engine(tiny_config(cache_dir, "async", dtype="float32", **placement))
    try:
        outputs = []
        sup.submit(GenerationRequest(1, PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True)), outputs.append)
        deadline = time.monotonic() + 60
        while not outputs and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(sup.worker_pids()[role], signal.SIGKILL)
        results = sup.generate(GenerationRequest(2, PROMPTS[1], SamplingParams(max_tokens=16)), timeout_s=300)
        assert outputs[-1].finished and outputs[-1].finish_reason in ("error", "length")
        assert results[-1].finish_reason in ("length", "stop") and results[-1].error is None
        assert sup.is_healthy()
    finally:
        sup.shutdown()
