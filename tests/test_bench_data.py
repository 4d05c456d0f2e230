"""Benchmark prompt loading: JSONL with prompts or chat messages, humaneval, clear errors."""
import json

import pytest

from engine.bench_data import humaneval_prompts, load_prompts
from engine.tiny_models import build_byte_tokenizer


def test_jsonl_prompts_and_messages(tmp_path):
    tokenizer = build_byte_tokenizer()
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ab"}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    plain, chat = load_prompts(str(path), tokenizer, 2)
    assert plain == tokenizer("ab")["input_ids"]
    assert tokenizer.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(SystemExit, match="only 2 prompts"):
        load_prompts(str(path), tokenizer, 3)
    with pytest.raises(SystemExit, match="neither humaneval"):
        load_prompts(str(tmp_path / "missing.jsonl"), tokenizer, 1)


def test_humaneval_ships_164_prompts():
    prompts = humaneval_prompts()
    assert len(prompts) == 164 and prompts[0].startswith("from typing import List")


def test_humaneval_scoring_runs_the_problems_tests():
    from engine.bench_data import humaneval_problems
    from engine.humaneval import passes, truncate_at_stop
    problem = humaneval_problems()[0]
    assert passes(problem, problem["canonical_solution"], timeout_s=30)
    assert not passes(problem, "    return None\n", timeout_s=30)
    assert truncate_at_stop("    return 1\n\ndef other():\n    pass") == ("    return 1\n", True)
    assert truncate_at_stop("    return 1\n") == ("    return 1\n", False)
