"""What a quantization scheme changes in the verify model's next-token distribution, teacher-forced.

    python -m engine.quant_quality --schemes none,int8,int4,int4-mixed [--num-tokens 400] [--json out.json]

The first scheme is the reference (default: `none`, the fp32 model). One text, the first HumanEval
problems' prompts and canonical solutions, is fed once through each scheme's model (transformers'
forward, fp32 activations outside the quantized layers); per position we compare the next-token
distributions: argmax agreement with the reference and mean KL(reference || scheme). A greedy
decode diverges from the reference only where the argmaxes differ, so agreement is the fraction of
positions where a scheme's greedy token is the reference's given the same prefix.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from engine.bench_data import humaneval_problems
from engine.config import default_cache_dir
from engine.models import load_causal_lm, resolve_model_spec


def teacher_forced_text(num_problems: int = 3) -> str:
    return "".join(p["prompt"] + p["canonical_solution"] for p in humaneval_problems()[:num_problems])


@torch.inference_mode()
def compare_schemes(path: str, schemes: list[str], ids: torch.Tensor) -> list[dict]:
    """ids [1, T] -> per scheme: argmax agreement and mean KL against schemes[0] over T positions."""
    reference, results = None, []
    for scheme in schemes:
        start = time.perf_counter()
        model = load_causal_lm(path, None, "cpu", "float32", scheme)
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)      # [T, V]
        del model
        if reference is None:
            reference = logprobs
        agreement = (logprobs.argmax(-1) == reference.argmax(-1)).float().mean().item()
        kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
        results.append({"scheme": scheme, "argmax_agreement": round(agreement, 4), "mean_kl": round(kl, 5),
                        "seconds": round(time.perf_counter() - start, 1)})
        print(results[-1], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="none,int8,int4,int4-mixed", help="the first is the reference")
    parser.add_argument("--model", default="default:verify")
    parser.add_argument("--num-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path, _ = resolve_model_spec(args.model, default_cache_dir())
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(path)(teacher_forced_text())["input_ids"][:args.num_tokens]
    results = compare_schemes(path, args.schemes.split(","), torch.tensor([ids]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "num_tokens": len(ids), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
