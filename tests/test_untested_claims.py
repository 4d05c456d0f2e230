"""Claims the README makes that nothing else tests (issue 14, item 9).

    half precision     bf16 / fp16 speculation equals `ar`, or differs only at a near-tie
    draft_vocab_size   a draft scoring only part of the vocabulary leaves the output unchanged
    bench report       identical-to-ar counting, first differing positions and their top-2 gaps
    top-p / min-p      rejection sampling stays exact with the nucleus and min-p filters
(GGUF conversion: tests/test_gguf_conversion.py.)
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.messages import SamplingParams  # noqa: E402
from tests.engine_helpers import (  # noqa: E402
    assert_same_or_near_tie, random_prompts, run, start_engine, tiny_config)
from tests.rejection_mutants import accept_everything  # noqa: E402
from tests.test_sampling import chi_square_p_value  # noqa: E402

PROMPTS = random_prompts(6, seed=4)
MAX_TOKENS = 48
NEAR_TIE_HALF = 0.5      # top-2 logit gap (in the run's dtype) under which half precision may flip a token


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _top2_gap(model, context: list[int]) -> float:
    with torch.no_grad():
        top = model(torch.tensor([context])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_greedy_equals_ar_up_to_near_ties(cache_dir, dtype):
    from engine.models import load_causal_lm, resolve_model_spec
    ar = start_engine(tiny_config(cache_dir, "ar", dtype=dtype))
    spec = start_engine(tiny_config(cache_dir, "async", dtype=dtype))
    try:
        pairs = [(p, run(ar, p, max_tokens=MAX_TOKENS, ignore_eos=True)[0],
                  run(spec, p, max_tokens=MAX_TOKENS, ignore_eos=True)) for p in PROMPTS]
    finally:
        ar.shutdown()
        spec.shutdown()
    model = load_causal_lm(resolve_model_spec("tiny-random/verify", cache_dir)[0], None, "cpu", dtype)
    num_accepted = 0
    for prompt, expected, (tokens, final) in pairs:
        num_accepted += final.stats.num_accepted_tokens
        assert_same_or_near_tie(prompt, expected, tokens, lambda context: _top2_gap(model, context), NEAR_TIE_HALF,
                                f"{dtype}: ")
    assert num_accepted > 0


def test_draft_vocab_size_leaves_the_output_unchanged(cache_dir):
    ar = start_engine(tiny_config(cache_dir, "ar"))
    spec = start_engine(tiny_config(cache_dir, "async", draft_vocab_size=64))
    try:
        num_accepted = 0
        for prompt in PROMPTS:
            expected, _ = run(ar, prompt, max_tokens=MAX_TOKENS)
            tokens, final = run(spec, prompt, max_tokens=MAX_TOKENS)
            assert tokens == expected
            num_accepted += final.stats.num_accepted_tokens
        assert num_accepted > 0
    finally:
        ar.shutdown()
        spec.shutdown()


def test_bench_report_counts_identity_and_measures_gaps(cache_dir):
    from engine.bench_report import first_difference_gaps, summarise
    from engine.models import load_causal_lm, resolve_model_spec

    def sample(ids):
        return {"token_ids": ids, "elapsed_s": 0.1 * len(ids), "token_times_s": [0.05], "stats": {}}

    prompts = [[1, 2, 3], [4, 5, 6]]
    raw = {"ar:1": [sample([7, 8, 9]), sample([10, 11, 12])], "async": [sample([7, 8, 9]), sample([10, 99, 12])]}
    parsed = {"ar:1": ("ar", 1), "async": ("async", 2)}
    report = {"methods": summarise(raw, parsed, "ar:1")}
    entry = report["methods"]["async"]
    assert entry["num_identical_to_ar"] == 1
    assert entry["differences"] == [{"sample": 1, "first_diff_position": 1}]
    verify_dir = resolve_model_spec("tiny-random/verify", cache_dir)[0]
    first_difference_gaps(report, raw, "ar:1", prompts, verify_dir, "float64")
    diff = entry["differences"][0]
    model = load_causal_lm(verify_dir, None, "cpu", "float64")
    assert diff["top2_logit_gap"] == pytest.approx(_top2_gap(model, [4, 5, 6, 10]), abs=1e-4)
    assert (diff["ar_token"], diff["method_token"]) == (11, 99)


# ---- rejection sampling with top-p and min-p (function level, through TokenChooser) ----------

VOCAB = 6
TARGET_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0], dtype=torch.float64)
DRAFT_LOGITS = torch.tensor([0.0, 2.0, 0.5, 1.5, -0.2, 0.3], dtype=torch.float64)
NUM_TRIALS = 4000


def _filtered(logits: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """The target distribution written out independently: softmax, then nucleus and min-p filters."""
    probs = torch.softmax(logits, 0)
    keep = torch.ones(VOCAB, dtype=torch.bool)
    if top_p < 1:
        order = torch.argsort(probs, descending=True)
        mass_before = torch.cumsum(probs[order], 0) - probs[order]
        keep[order[mass_before >= top_p]] = False
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def _first_tokens(params_kw: dict) -> torch.Tensor:
    from engine.token_chooser import DRAFT_STREAM, VERIFY_STREAM, TokenChooser
    counts = torch.zeros(VOCAB)
    for trial in range(NUM_TRIALS):
        params = SamplingParams(temperature=1.0, seed=trial, **params_kw)
        draft = TokenChooser(params, "rejection", DRAFT_STREAM)
        verify = TokenChooser(params, "rejection", VERIFY_STREAM)
        proposal, q = draft.draft(DRAFT_LOGITS.view(1, -1), [])
        _, committed = verify.verify(TARGET_LOGITS.expand(2, VOCAB), [], proposal.tolist(), q)
        counts[committed[0]] += 1
    return counts


@pytest.mark.parametrize("params_kw", [dict(top_p=0.8), dict(min_p=0.3), dict(top_p=0.9, min_p=0.2)])
def test_rejection_sampling_is_exact_with_top_p_and_min_p(params_kw, monkeypatch):
    expected = _filtered(TARGET_LOGITS, params_kw.get("top_p", 1.0), params_kw.get("min_p", 0.0))
    assert 1 < int((expected > 0).sum()) < VOCAB, "the filter must remove some tokens and keep several"
    counts = _first_tokens(params_kw)
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"filtered tokens were emitted: {counts}"
    assert chi_square_p_value(counts[kept], expected[kept]) > 1e-3, (counts, expected)
    # The same test rejects a verifier that accepts every draft token.
    import engine.token_chooser
    monkeypatch.setattr(engine.token_chooser, "rejection_verify", accept_everything)
    broken = _first_tokens(params_kw)
    assert broken[~kept].sum() > 0 or chi_square_p_value(broken[kept], expected[kept]) < 1e-3
