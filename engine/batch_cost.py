"""What one batched pass costs: LeanDecoder.forward_batch over B sequences x T new tokens each.

    python -m engine.batch_cost --threads 2 [--json out.json]

For the default pair as `quantization: auto` runs it on CPU (fp32 activations; verify int8, draft
int8-fast): every sequence has a 300-token context in its own KV slot; each pass appends T random
tokens to each of B slots, runs the output layer, and the slots are cropped back. Median of 6 passes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.config import default_cache_dir
from engine.decoder import LeanDecoder
from engine.models import load_causal_lm, resolve_model_spec

CONTEXT_TOKENS = 300
NUM_REPEATS = 6
SHAPES = [(b, t) for t in (1, 4) for b in (1, 2, 4, 8)]


def pass_costs_ms(path: str, quantization: str, max_batch: int = 8) -> dict[str, float]:
    model = load_causal_lm(path, None, "cpu", "float32", quantization)
    decoder, vocab = LeanDecoder(model), model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    slots = [decoder.new_slot() for _ in range(max_batch)]
    for slot in slots:
        decoder.forward_batch([(slot, torch.randint(0, vocab, (CONTEXT_TOKENS,), generator=generator))])
    costs = {}
    for batch, num_new in SHAPES:
        times = []
        for _ in range(NUM_REPEATS):
            rows = [(slot, torch.randint(0, vocab, (num_new,), generator=generator)) for slot in slots[:batch]]
            start = time.perf_counter()
            model.lm_head(decoder.forward_batch(rows))
            times.append(time.perf_counter() - start)
            for slot in slots[:batch]:
                slot.num_cached -= num_new
        costs[f"B{batch}xT{num_new}"] = round(1e3 * statistics.median(times), 1)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "context_tokens": CONTEXT_TOKENS, "ms_per_pass_median": {}}
    for role, quantization in (("verify", "int8"), ("draft", "int8-fast")):
        path, _ = resolve_model_spec(f"default:{role}", default_cache_dir())
        results["ms_per_pass_median"][f"{role} {quantization}"] = costs = pass_costs_ms(path, quantization)
        print(role, quantization, costs, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
