"""engine/draft_head.py: a draft scoring ids < N plus its running prompts' ids; the verify's output unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.batch_decode import BatchDecoder
from engine.batch_draft import BatchDrafter
from engine.cost_model import SpeculationBudget
from engine.decoding import Verifier
from engine.draft_head import SubsetHead
from engine.kv_budget import KVBudget
from engine.models import ModelRunner
from engine.quantization import make_quantized
from tests.test_batch_decode import CHUNK, _alone, _assert_each_as_alone, _collect, _requests, _run_joining

VOCAB, HIDDEN, NUM_IDS = 300, 64, 100


def _float_head() -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quantization", ["none", "int8-fast"])
def test_the_prefix_and_the_running_prompts_ids_are_scored_and_nothing_else(quantization):
    weight, hidden = _float_head(), torch.randn(3, HIDDEN)
    head = SubsetHead(weight, NUM_IDS, quantization, torch.float32)
    prefix = nn.Linear(HIDDEN, NUM_IDS, bias=False)
    prefix.weight.data.copy_(weight[:NUM_IDS])
    expected_prefix = prefix(hidden) if quantization == "none" else make_quantized(prefix, quantization)(hidden)
    head.score_prompt("a", [5, 150, 151, 150])                 # 5 is in the prefix anyway
    head.score_prompt("b", [151, 299, 400])                     # 400: not a row of this head (ignored)
    logits = head(hidden)
    assert logits.shape == (3, VOCAB)
    assert torch.equal(logits[:, :NUM_IDS], expected_prefix.detach())
    for token_id in (150, 151, 299):
        assert torch.allclose(logits[:, token_id], hidden @ weight[token_id])
    scored = set(range(NUM_IDS)) | {150, 151, 299}
    assert all(torch.isinf(logits[:, i]).all() for i in range(VOCAB) if i not in scored)
    head.forget_prompt("a")                                      # 150 leaves with "a"; 151 stays with "b"
    logits = head(hidden)
    assert torch.isinf(logits[:, 150]).all() and not torch.isinf(logits[:, 151]).any()
    head.forget_prompt("b")
    assert torch.isinf(head(hidden)[:, NUM_IDS:]).all()


def test_a_quantized_untied_head_cannot_be_subset_and_says_why(draft_model):
    runner = ModelRunner(draft_model, "cpu", decoder_impl="lean")
    runner.lm_head = make_quantized(nn.Linear(HIDDEN, 8), "int8")      # no float matrix left to take rows from
    with pytest.raises(ValueError, match="draft_vocab_size needs the float output matrix"):
        runner.use_vocab_subset(4, "int8")
    runner.use_vocab_subset(0, "int8")                                  # 0 = the whole vocabulary: nothing to do
    assert runner.subset_head is None


def test_a_sync_batch_with_a_draft_vocabulary_subset_gives_each_request_what_it_gets_alone(model, draft_model):
    """Requests joining mid-flight, a cancel, seeded sampling: the verify decides every token, so a
    draft that cannot propose most ids only drafts less well; its proposals stay inside the subset
    and its running prompts' ids."""
    requests = _requests(model.config.vocab_size)
    verifier = Verifier(ModelRunner(model, "cpu", prefill_chunk_tokens=CHUNK, decoder_impl="lean"),
                        SpeculationBudget(None, 8, num_fixed=3))
    draft_runner = ModelRunner(draft_model, "cpu", decoder_impl="lean")
    num_ids = draft_runner.vocab_size // 3
    draft_runner.use_vocab_subset(num_ids, "none")
    allowed = set(range(num_ids)).union(*(req.prompt_token_ids for req in requests))
    proposed: list[int] = []
    drafter = BatchDrafter(draft_runner, max_catch_up=CHUNK, max_verify_rows=100)
    propose = drafter.propose

    def recording_propose(runs, num_prompt_left=0):
        proposals = propose(runs, num_prompt_left)
        proposed.extend(token for p in proposals.values() for token in p.draft_ids)
        return proposals
    drafter.propose = recording_propose
    batch = BatchDecoder(verifier, 4, CHUNK, True, KVBudget(100_000, 1, "test"), 64, drafter)
    outputs, _ = _run_joining(batch, requests)
    _assert_each_as_alone(_collect(outputs), _alone(model, requests), requests)
    assert proposed and set(proposed) <= allowed
    assert any(token >= num_ids for token in proposed)                # prompt ids past the subset were drafted
    assert draft_runner.subset_head._extra_ids is None                  # every request left: no prompt ids kept
