"""A verify whose output rows are padded past the tokenizer, beside a draft that is not (issue 11, item 1).

Qwen2.5-7B scores 152064 rows and Qwen2.5-0.5B 151936 with one tokenizer; `tiny-random/verify-padded`
is tiny-random/verify plus 16 random padding rows, so the pair differs only there. Its padding ids
carry some probability mass, so sampled runs commit padding ids that the draft has no embedding for.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.config import ConfigError  # noqa: E402
from engine.models import check_same_vocab, load_causal_lm, resolve_model_spec  # noqa: E402
from engine.tiny_models import TINY_PADDING_ROWS  # noqa: E402
from tests.engine_helpers import random_prompts, run, start_engine, tiny_config  # noqa: E402

PROMPTS = random_prompts(5, seed=3)
MAX_TOKENS = 48
TOKENIZER_SIZE = 259
PADDED = "tiny-random/verify-padded"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _load(spec: str, cache: str):
    path, _ = resolve_model_spec(spec, cache)
    return load_causal_lm(path, None, "cpu", "float64"), path


def test_pair_check_allows_padding_and_refuses_a_bigger_draft(cache):
    (verify, verify_dir), (draft, draft_dir) = _load(PADDED, cache), _load("tiny-random/draft", cache)
    assert verify.get_output_embeddings().weight.shape[0] == TOKENIZER_SIZE + TINY_PADDING_ROWS
    check_same_vocab(verify, draft, verify_dir, draft_dir)          # same tokenizer, draft rows <= verify rows
    with pytest.raises(ConfigError, match="more than the verify"):
        check_same_vocab(draft, verify, draft_dir, verify_dir)


@pytest.fixture(scope="module")
def engines(cache):
    configs = {
        "ar": dict(mode="ar"),
        "sync": dict(mode="sync"),
        "async": dict(mode="async"),
        "async-rejection": dict(mode="async", sampling_scheme="rejection"),
        "sync-rejection": dict(mode="sync", sampling_scheme="rejection"),
    }
    started = {}
    try:
        for name, kw in configs.items():
            started[name] = start_engine(tiny_config(cache, verify_model=PADDED, **kw))
        yield started
    finally:
        for sup in started.values():
            sup.shutdown()


@pytest.mark.parametrize("name", ["sync", "async"])
def test_greedy_and_coupled_sampling_equal_ar(engines, name):
    num_accepted = num_padding_ids = 0
    for i, prompt in enumerate(PROMPTS):
        for params in (dict(), dict(temperature=1.0, seed=100 + i)):
            expected, _ = run(engines["ar"], prompt, max_tokens=MAX_TOKENS, **params)
            tokens, final = run(engines[name], prompt, max_tokens=MAX_TOKENS, **params)
            assert tokens == expected, f"{name} diverged from ar with {params or 'greedy'}"
            num_accepted += final.stats.num_accepted_tokens
            num_padding_ids += sum(t >= TOKENIZER_SIZE for t in tokens)
    assert num_accepted > 0, "the draft's proposals must be checked and accepted"
    # The sampled runs committed ids the draft has no row for, and the draft carried on past them.
    assert num_padding_ids > 0


@pytest.mark.parametrize("name", ["async-rejection", "sync-rejection"])
def test_rejection_sampling_pads_the_draft_distribution(engines, name):
    num_accepted = num_padding_ids = 0
    for i, prompt in enumerate(PROMPTS):
        tokens, final = run(engines[name], prompt, max_tokens=MAX_TOKENS, temperature=1.0, seed=7 + i)
        assert final.finish_reason in ("length", "stop") and final.error is None
        assert all(0 <= t < TOKENIZER_SIZE + TINY_PADDING_ROWS for t in tokens)
        num_accepted += final.stats.num_accepted_tokens
        num_padding_ids += sum(t >= TOKENIZER_SIZE for t in tokens)
    assert num_accepted > 0
    assert num_padding_ids > 0, "padding ids (p > 0, q = 0) must be reachable through the residual"
