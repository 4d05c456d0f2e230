"""Server-overhead measurement: the prompts of `amusd bench`, one at a time over HTTP streaming.

    python -m loadtest.overhead --base-url http://127.0.0.1:8000 --dataset humaneval \\
        --num-prompts 10 --max-tokens 128 --endpoint completions [--reference-ms-per-token 41.2]

Sends the first N prompts of the dataset in dataset order, sequentially (concurrency 1),
greedy (temperature 0), with a fixed max_tokens, after --num-warmup unmeasured requests, and
reports
    ms_per_token  sum of e2e latencies / sum of output tokens (prefill included, like one
                  whole generate call of `amusd bench`)
    tpot_ms       mean time per output token after the first
Run `amusd bench` with the same prompts, max_tokens and method as the server, then pass its
ms/token as --reference-ms-per-token: the overhead is printed, and the exit status is 1 when it
exceeds --max-overhead-pct (goal: HTTP serving at most 5 % slower than the bare engine).
Exit 2 on bad arguments or a non-loopback target (see `python -m loadtest --help`).
"""
from __future__ import annotations

import argparse
import json
import sys

from loadtest.cli import EXIT_LOST, EXIT_OK, EXIT_USAGE, add_target_arguments, target_error
from loadtest.client import STATUS_COMPLETED, RequestOptions
from loadtest.datasets import DatasetError, load_prompts
from loadtest.report import latency_stats_ms, summarize
from loadtest.runner import LoadConfig, LoadOutcome, run_load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser)
    parser.set_defaults(endpoint="completions")
    parser.add_argument("--num-prompts", type=int, default=10, help="first N prompts of the dataset")
    parser.add_argument("--num-warmup", type=int, default=1, help="unmeasured requests sent first")
    parser.add_argument("--reference-ms-per-token", type=float,
                        help="`amusd bench` ms per output token on the same prompts")
    parser.add_argument("--max-overhead-pct", type=float, default=5.0)
    return parser


def overhead_summary(outcome: LoadOutcome, reference_ms_per_token: float | None) -> dict:
    completed = [r for r in outcome.results if r.status == STATUS_COMPLETED]
    num_tokens = sum(r.num_output_tokens for r in completed)
    total_e2e_s = sum(r.e2e_s or 0.0 for r in completed)
    ms_per_token = 1000.0 * total_e2e_s / num_tokens if num_tokens else None
    overhead_pct = None
    if ms_per_token is not None and reference_ms_per_token:
        overhead_pct = 100.0 * (ms_per_token / reference_ms_per_token - 1.0)
    return {"num_prompts": len(outcome.results), "num_completed": len(completed),
            "num_output_tokens": num_tokens, "ms_per_token": ms_per_token,
            "tpot_ms": latency_stats_ms([r.tpot_s for r in completed if r.tpot_s is not None])["mean"],
            "ttft_ms": latency_stats_ms([r.ttft_s for r in completed if r.ttft_s is not None])["mean"],
            "reference_ms_per_token": reference_ms_per_token, "overhead_pct": overhead_pct,
            "model": outcome.model}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    error = target_error(args.base_url, is_remote_allowed=args.allow_remote)
    if error is None and (args.num_prompts < 1 or args.num_warmup < 0):
        error = "--num-prompts must be >= 1 and --num-warmup >= 0"
    if error is None:
        try:
            prompts = load_prompts(args.dataset)
        except DatasetError as exc:
            error = str(exc)
    if error is not None:
        print(f"loadtest.overhead: {error}", file=sys.stderr)
        return EXIT_USAGE
    options = RequestOptions(endpoint=args.endpoint, model=args.model, max_tokens=args.max_tokens,
                             temperature=0.0, ignore_eos=args.ignore_eos)
    base = dict(base_url=args.base_url, options=options, concurrency=1, timeout_s=args.timeout_s,
                read_timeout_s=args.read_timeout_s, is_shuffled=False)
    if args.num_warmup:
        run_load(LoadConfig(**base, num_requests=args.num_warmup), prompts)
    outcome = run_load(LoadConfig(**base, num_requests=args.num_prompts), prompts)
    counts = summarize(outcome, {})
    summary = {**overhead_summary(outcome, args.reference_ms_per_token),
               "num_lost": counts["num_lost"], "num_timed_out": counts["num_timed_out"],
               "status_counts": counts["status_counts"], "endpoint": args.endpoint,
               "dataset": args.dataset, "max_tokens": args.max_tokens}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if summary["num_completed"] != args.num_prompts:
        print(f"loadtest.overhead: only {summary['num_completed']} of {args.num_prompts} requests completed",
              file=sys.stderr)
        return EXIT_LOST
    if summary["overhead_pct"] is not None and summary["overhead_pct"] > args.max_overhead_pct:
        print(f"loadtest.overhead: overhead {summary['overhead_pct']:.1f} % > {args.max_overhead_pct} %",
              file=sys.stderr)
        return EXIT_LOST
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
