"""Greedy `ar` against references outside the engine (tiny float64 models, live workers).

Every identity test in test_engine_lossless.py compares a mode with the engine's own `ar`, which
shares ModelRunner (KV cache, prefix cache, chunked prefill), Verifier and TokenChooser with the
other modes: a bug there is invisible to them. Here the references use none of engine/:

    full recompute   plain transformers forward over the whole sequence for every token
                     (use_cache=False), argmax, ignore EOS: 64 tokens per prompt
    generate         transformers' own generate(do_sample=False) with its KV cache, stopping
                     at EOS as the engine does without ignore_eos

The prompts run back to back on one engine, in an order where later prompts share prefixes with
earlier ones (prefix cache reuse and divergence), with small prefill chunks (chunked prefill).
"""
from __future__ import annotations

import pytest
import torch

from engine.tiny_models import ensure_tiny_model
from tests.engine_helpers import random_prompts, run, start_engine, tiny_config

NUM_TOKENS = 64
BASE = random_prompts(4, seed=11)
PROMPTS = [
    BASE[0],
    BASE[0] + BASE[1],                  # extends the previous prompt: its KV is reused
    BASE[0][:3] + BASE[2],              # shares only 3 tokens: the cache must be cut back
    BASE[3] * 4,                        # longer than one prefill chunk
    [BASE[1][0]],                       # a one-token prompt
    BASE[0] + BASE[1] + [7, 7, 7],      # a longer follow-up of prompt 2 after other requests
]
PREFILL_CHUNK = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_model(cache_dir):
    from transformers import AutoModelForCausalLM
    path = ensure_tiny_model("tiny-random/verify", cache_dir)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def ar_engine(cache_dir):
    sup = start_engine(tiny_config(cache_dir, "ar", prefill_chunk_tokens=PREFILL_CHUNK))
    yield sup
    sup.shutdown()


def full_recompute_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


def hf_generate_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=num_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_reference_prompts_are_long_enough():
    assert all(len(p) + NUM_TOKENS < 512 for p in PROMPTS)          # tiny_config's max_model_len
    assert len(PROMPTS[3]) > 2 * PREFILL_CHUNK


def test_ar_greedy_equals_full_recompute(ar_engine, hf_model):
    for index, prompt in enumerate(PROMPTS):
        expected = full_recompute_greedy(hf_model, prompt, NUM_TOKENS)
        tokens, final = run(ar_engine, prompt, max_tokens=NUM_TOKENS, ignore_eos=True)
        assert final.finish_reason == "length"
        assert tokens == expected, f"prompt {index}: ar diverges from a full recompute at token " \
                                   f"{next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)}"


def test_ar_greedy_equals_transformers_generate(ar_engine, hf_model):
    num_stopped = 0
    for index, prompt in enumerate(PROMPTS):
        expected = hf_generate_greedy(hf_model, prompt, NUM_TOKENS)
        tokens, final = run(ar_engine, prompt, max_tokens=NUM_TOKENS)
        assert tokens == expected, f"prompt {index}: ar differs from transformers generate"
        assert final.finish_reason == ("stop" if len(expected) < NUM_TOKENS else "length")
        num_stopped += final.finish_reason == "stop"
    print(f"\n[reference] {num_stopped} of {len(PROMPTS)} prompts stopped at EOS before {NUM_TOKENS} tokens")
