"""`amusd humaneval`: greedy HumanEval pass@1 of the verify model as the engine runs it.

    amusd humaneval --num-problems 164 --verify-quantization int8 --json he-int8.json
    amusd humaneval --num-problems 40 --verify-quantization none --dtype float32 --json he-fp32.json

Shows what a quantization costs in quality: every mode commits the verify model's own greedy
tokens, so the fastest (async) measures the same model `ar` would. Each problem's prompt is
completed until a HumanEval stop sequence (the request is then cancelled) or --max-new-tokens,
and prompt + completion + the problem's tests run in a fresh `python` with a timeout.
Problems are taken in file order, the first --num-problems of the 164.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

from engine.bench_data import humaneval_problems
from engine.config import EngineConfig
from engine.messages import GenerationRequest, SamplingParams
from engine.supervisor import EngineSupervisor

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def truncate_at_stop(text: str) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def complete(sup: EngineSupervisor, tokenizer, request_id: int, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy completion of `prompt`, cancelled as soon as a stop sequence appears."""
    outputs: queue.Queue = queue.Queue()
    sup.submit(GenerationRequest(request_id, tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=max_new_tokens)),
               outputs.put)
    token_ids: list[int] = []
    is_cancelled = False
    while True:
        out = outputs.get(timeout=600)
        token_ids += out.token_ids
        if out.finished:
            if out.finish_reason == "error":
                raise RuntimeError(f"request failed: {out.error}")
            break
        if not is_cancelled and truncate_at_stop(tokenizer.decode(token_ids))[1]:
            sup.cancel(request_id)
            is_cancelled = True
    return truncate_at_stop(tokenizer.decode(token_ids))[0], len(token_ids)


def passes(problem: dict, completion: str, timeout_s: float) -> bool:
    program = problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(program)
    try:
        result = subprocess.run([sys.executable, f.name], capture_output=True, timeout=timeout_s)
        return result.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="amusd humaneval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-problems", type=int, default=164)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--verify-model", default="default:verify")
    p.add_argument("--draft-model", default="default:draft")
    p.add_argument("--mode", default="async", help="any mode commits the same tokens; async is the fastest")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--verify-quantization", default="auto")
    p.add_argument("--draft-quantization", default="auto")
    p.add_argument("--test-timeout-s", type=float, default=15.0)
    p.add_argument("--json", default="humaneval.json")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from engine.models import resolve_model_spec
    config = EngineConfig(verify_model=args.verify_model, draft_model=args.draft_model, mode=args.mode,
                          dtype=args.dtype, verify_quantization=args.verify_quantization,
                          draft_quantization=args.draft_quantization)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_spec(args.verify_model, config.cache_dir)[0])
    problems = humaneval_problems()[: args.num_problems]
    sup = EngineSupervisor(config)
    sup.start()
    results, request_ids, start = [], itertools.count(1), time.perf_counter()
    try:
        runtime = sup.health()["workers"]["verify"]
        for problem in tqdm(problems, desc="humaneval", unit="problem"):
            completion, num_tokens = complete(sup, tokenizer, next(request_ids), problem["prompt"], args.max_new_tokens)
            results.append({"task_id": problem["task_id"], "passed": passes(problem, completion, args.test_timeout_s),
                            "num_tokens": num_tokens, "completion": completion})
    finally:
        sup.shutdown()
    num_passed = sum(r["passed"] for r in results)
    report = {"num_problems": len(results), "num_passed": num_passed, "pass_at_1": num_passed / max(len(results), 1),
              "verify_dtype": runtime.get("dtype"), "verify_quantization": runtime.get("quantization"),
              "elapsed_s": round(time.perf_counter() - start, 1), "args": vars(args), "results": results}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"HumanEval greedy pass@1 = {num_passed}/{len(results)} = {report['pass_at_1']:.3f} "
          f"(verify {report['verify_dtype']}, quantization {report['verify_quantization']}); wrote {args.json}")
    return 0
