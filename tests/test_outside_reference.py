"""`ar` against a reference outside the engine: transformers' own greedy `generate` (issue 14, item 4).

Every identity test compares sync/async with the engine's `ar`, which shares ModelRunner, Verifier
and TokenChooser with them; this one checks `ar` itself end to end (tiny models, float64, over HTTP-
free engine calls) against code the engine does not share.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine.models import resolve_model_spec  # noqa: E402
from tests.engine_helpers import random_prompts, run, start_engine, tiny_config  # noqa: E402

PROMPTS = random_prompts(4, seed=11)
MAX_TOKENS = 48


def test_ar_greedy_equals_transformers_generate(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    cache = str(tmp_path_factory.mktemp("cache"))
    path, _ = resolve_model_spec("tiny-random/verify", cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    sup = start_engine(tiny_config(cache, "ar"))
    try:
        for prompt in PROMPTS:
            tokens, final = run(sup, prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                     eos_token_id=None, pad_token_id=0)
            expected = out[0, len(prompt):].tolist()
            assert len(tokens) == MAX_TOKENS and final.finish_reason == "length"
            assert tokens == expected, f"ar and transformers differ on prompt {prompt[:8]}..."
    finally:
        sup.shutdown()
