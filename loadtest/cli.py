"""Command line of the load generator (`python -m loadtest`), in the spirit of `vllm bench serve`.

    python -m loadtest --base-url http://127.0.0.1:8000 --num-requests 200 --concurrency 32 \\
        --dataset humaneval --max-tokens 128 --json loadtest.json --plot loadtest.png
    python -m loadtest --request-rate 4 --dataset chat --endpoint chat --disconnect-fraction 0.1

Prints a table (TTFT / ITL / TPOT / e2e percentiles, tokens/s, counts by outcome) and exits
    0  every request is accounted for (completed, HTTP error, stream error or hung up on purpose)
    1  a request was lost (dropped connection or truncated stream) or the --timeout-s ran out
    2  bad arguments, unusable dataset, or a target that is not this machine
Only loopback targets (127.0.0.0/8, ::1, localhost) are allowed unless --allow-remote.
For the server-overhead measurement (sequential, greedy) see `python -m loadtest.overhead`.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import sys
from pathlib import Path
from urllib.parse import urlsplit

from loadtest.client import RequestOptions
from loadtest.datasets import DatasetError, load_prompts
from loadtest.report import format_comparison, format_table, is_nothing_lost, summarize, write_report_json
from loadtest.runner import LoadConfig, run_load

EXIT_OK, EXIT_LOST, EXIT_USAGE = 0, 1, 2


def target_error(base_url: str, *, is_remote_allowed: bool = False) -> str | None:
    """Why `base_url` may not be load-tested, or None if it may."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--base-url must look like http://127.0.0.1:8000, got {base_url!r}"
    if is_remote_allowed:
        return None
    host = parts.hostname
    if host == "localhost":
        return None
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if is_loopback:
        return None
    return (f"refusing to load-test {host}: only this machine (127.0.0.0/8, ::1, localhost) "
            "is allowed; pass --allow-remote for a host you are entitled to load")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with loadtest.overhead: where to send and what to ask for."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--model", default="", help="model name to send (default: first of GET /v1/models)")
    parser.add_argument("--dataset", default="humaneval", help="humaneval | chat | PATH.jsonl")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true (fixed output length)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on the whole run")
    parser.add_argument("--read-timeout-s", type=float, default=120.0,
                        help="silence on one stream after which it counts as dropped")
    parser.add_argument("--json", type=Path, help="write the report (summary + per-request records) here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit status: 0 ok, 1 requests lost or timed out, 2 usage error.")
    add_target_arguments(parser)
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrivals per second (default inf: all at once, capped by --concurrency)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--disconnect-fraction", type=float, default=0.0,
                        help="share of requests that hang up mid-stream on purpose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detailed", action="store_true", help="per-request ITLs and chunk times in --json")
    parser.add_argument("--plot", type=Path, help="write a PNG of latency distributions and throughput")
    parser.add_argument("--peer-url", default=None,
                        help="then run the same requests against this OpenAI-compatible server (e.g. llama-server) "
                             "and print both with their ratios")
    return parser


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    options = RequestOptions(endpoint=args.endpoint, model=args.model, max_tokens=args.max_tokens,
                             temperature=args.temperature, ignore_eos=args.ignore_eos)
    return LoadConfig(base_url=args.base_url, options=options, num_requests=args.num_requests,
                      concurrency=args.concurrency, request_rate=args.request_rate,
                      disconnect_fraction=args.disconnect_fraction, timeout_s=args.timeout_s,
                      read_timeout_s=args.read_timeout_s, seed=args.seed)


def config_record(config: LoadConfig, dataset: str) -> dict:
    return {"base_url": config.base_url, "endpoint": config.options.endpoint, "dataset": dataset,
            "num_requests": config.num_requests, "concurrency": config.concurrency,
            "request_rate": None if math.isinf(config.request_rate) else config.request_rate,
            "max_tokens": config.options.max_tokens, "temperature": config.options.temperature,
            "ignore_eos": config.options.ignore_eos, "disconnect_fraction": config.disconnect_fraction,
            "timeout_s": config.timeout_s, "seed": config.seed}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    error = target_error(args.base_url, is_remote_allowed=args.allow_remote)
    if error is None and args.peer_url:
        error = target_error(args.peer_url, is_remote_allowed=args.allow_remote)
    config = config_from_args(args)
    if error is None:
        try:
            config.validate()
            prompts = load_prompts(args.dataset)
        except (ValueError, DatasetError) as exc:
            error = str(exc)
    if error is not None:
        print(f"loadtest: {error}", file=sys.stderr)
        return EXIT_USAGE
    outcome = run_load(config, prompts)
    summary = summarize(outcome, config_record(config, args.dataset))
    print(format_table(summary))
    if args.peer_url:
        peer_config = dataclasses.replace(config, base_url=args.peer_url,
                                          options=dataclasses.replace(config.options, model=""))
        peer_outcome = run_load(peer_config, prompts)
        summary["peer"] = summarize(peer_outcome, config_record(peer_config, args.dataset))
        print(format_table(summary["peer"]))
        print(format_comparison(summary, summary["peer"]))
    if args.json:
        write_report_json(args.json, summary, outcome.results, is_detailed=args.detailed)
        print(f"report written to {args.json}")
    if args.plot:
        from loadtest.plot import write_plot
        write_plot(outcome, args.plot)
        print(f"plot written to {args.plot}")
    if not is_nothing_lost(summary):
        print(f"loadtest: FAILED: {summary['num_lost']} request(s) lost, "
              f"{summary['num_timed_out']} timed out", file=sys.stderr)
        return EXIT_LOST
    return EXIT_OK
