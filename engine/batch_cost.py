"""What one batched pass costs: LeanDecoder.forward_batch over B sequences x T new tokens each.

    python -m engine.batch_cost --threads 2 [--json out.json]
    python -m engine.batch_cost --threads 2 --join      # a long prompt joins decoding streams
    python -m engine.batch_cost --threads 2 --verify-quantizations int8,int4    # the verify under each scheme
    python -m engine.batch_cost --threads 2 --int8-kernels fbgemm,onednn          # the int8 layers on each kernel

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
from engine.hardware import INT8_KERNELS, default_int8_kernel
from engine.models import load_causal_lm, resolve_model_spec
from engine.quantization import quantize_model

CONTEXT_TOKENS = 300
NUM_REPEATS = 6
SHAPES = [(b, t) for t in (1, 4) for b in (1, 2, 4, 8)]


def pass_costs_ms(path: str, quantization: str, max_batch: int = 8, int8_kernel: str | None = None) -> dict[str, float]:
    model = load_causal_lm(path, None, "cpu", "float32")
    with torch.inference_mode():
        quantize_model(model, quantization, int8_kernel)
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


def join_costs(path: str, budgets=(512, 64), num_streams: int = 4, num_prompt_tokens: int = 1000) -> list[dict]:
    """A `num_prompt_tokens` prompt joins `num_streams` decoding ones in the verify's BatchDecoder, per
    max_num_batched_tokens budget (512 = a whole prefill chunk beside them): the newcomer's time to
    first token and the streams' gaps between tokens while it prefills (each budget twice, alternating)."""
    from engine.batch_decode import BatchDecoder
    from engine.cost_model import SpeculationBudget
    from engine.decoding import Verifier, new_sequence
    from engine.kv_budget import KVBudget
    from engine.messages import SamplingParams, StartRequest, TokensOut
    from engine.models import ModelRunner
    model, rng, results = load_causal_lm(path, None, "cpu", "float32", "int8"), torch.Generator().manual_seed(0), []
    prompt = lambda n: torch.randint(1000, 20000, (n,), generator=rng).tolist()       # noqa: E731
    for budget in [*budgets, *budgets]:
        runner = ModelRunner(model, "cpu", prefill_chunk_tokens=512, decoder_impl="lean")
        batch = BatchDecoder(Verifier(runner, SpeculationBudget(None, 8)), 8, 512, False,
                             KVBudget(1 << 20, 1, "unbounded"), budget)
        for i in range(num_streams):
            batch.admit(new_sequence(StartRequest(i + 1, prompt(40), SamplingParams(max_tokens=400, ignore_eos=True)),
                                     [], 4096, "coupled"))
        for _ in range(3):
            batch.step(lambda out: None)
        batch.admit(new_sequence(StartRequest(99, prompt(num_prompt_tokens), SamplingParams(max_tokens=5)),
                                 [], 4096, "coupled"))
        start, gaps, outputs = time.perf_counter(), [], []
        while not any(isinstance(out, TokensOut) and out.request_id == 99 for out in outputs):
            step_start = time.perf_counter()
            outputs.clear()
            batch.step(outputs.append)
            gaps.append(time.perf_counter() - step_start)
        results.append({"max_num_batched_tokens": budget, "newcomer_ttft_s": round(time.perf_counter() - start, 2),
                        "num_passes": len(gaps), "longest_gap_s": round(max(gaps), 2),
                        "median_gap_s": round(statistics.median(gaps), 2)})
        print(results[-1], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--join", action="store_true", help="a 1000-token prompt joining 4 decoding streams")
    parser.add_argument("--verify-quantizations", default="int8",
                        help="comma-separated schemes to measure the verify under (engine/quantization.py)")
    parser.add_argument("--int8-kernels", default=default_int8_kernel(),
                        help=f"comma-separated kernels of the int8 layers, each measured in turn: {INT8_KERNELS}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.join:
        path, _ = resolve_model_spec("default:verify", default_cache_dir())
        _write(args.json, {"threads": args.threads, "join": join_costs(path)})
        return
    results = {"threads": args.threads, "context_tokens": CONTEXT_TOKENS, "ms_per_pass_median": {}}
    schemes = [("verify", q) for q in args.verify_quantizations.split(",")] + [("draft", "int8-fast")]
    for kernel in args.int8_kernels.split(","):
        for role, quantization in schemes:
            path, _ = resolve_model_spec(f"default:{role}", default_cache_dir())
            costs = pass_costs_ms(path, quantization, int8_kernel=kernel)
            results["ms_per_pass_median"][f"{role} {quantization} {kernel}"] = costs
            print(role, quantization, kernel, costs, flush=True)
    _write(args.json, results)


def _write(json_path: str | None, results: dict) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
