"""The load-test report: percentiles, counts, the printed table and the JSON file.

    summary = summarize(outcome, config_record)     # dict, JSON-ready
    print(format_table(summary)); write_report_json(path, summary, outcome.results)

Latencies are over completed requests, in milliseconds: TTFT (time to first token), ITL
(every gap between streamed chunks; with speculative decoding one chunk may carry several
tokens), TPOT (per request: (e2e - ttft) / (tokens - 1)) and e2e. `num_lost` = dropped + truncated streams; intentional disconnects, HTTP errors and
timed-out requests are counted separately and are not "lost".
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loadtest.client import (STATUS_COMPLETED, STATUS_DISCONNECTED, STATUS_DROPPED, STATUS_HTTP_ERROR,
                             STATUS_STREAM_ERROR, STATUS_TIMED_OUT, STATUS_TRUNCATED, RequestResult)
from loadtest.runner import LoadOutcome

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower, upper = math.floor(position), math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def latency_stats_ms(values_s: Sequence[float]) -> dict:
    """count, mean and percentiles, in milliseconds; None values when there is no sample."""
    values_ms = [v * 1000.0 for v in values_s]
    stats: dict = {"count": len(values_ms), "mean": sum(values_ms) / len(values_ms) if values_ms else None}
    for q in PERCENTILES:
        stats[f"p{q}"] = percentile(values_ms, q)
    return stats


def summarize(outcome: LoadOutcome, config_record: dict) -> dict:
    results = outcome.results
    statuses = Counter(r.status for r in results)
    http_codes = Counter(r.http_status for r in results if r.status == STATUS_HTTP_ERROR)
    completed = [r for r in results if r.status == STATUS_COMPLETED]
    num_output_tokens = sum(r.num_output_tokens for r in completed)
    duration_s = outcome.duration_s
    return {
        "config": {**config_record, "model": outcome.model},
        "duration_s": duration_s,
        "num_requests": len(results),
        "num_completed": statuses[STATUS_COMPLETED],
        "num_disconnected": statuses[STATUS_DISCONNECTED],
        "num_http_4xx": sum(n for code, n in http_codes.items() if 400 <= code < 500),
        "num_http_5xx": sum(n for code, n in http_codes.items() if code >= 500),
        "http_status_counts": {str(code): n for code, n in sorted(http_codes.items())},
        "num_stream_errors": statuses[STATUS_STREAM_ERROR],
        "num_dropped": statuses[STATUS_DROPPED],
        "num_truncated": statuses[STATUS_TRUNCATED],
        "num_lost": statuses[STATUS_DROPPED] + statuses[STATUS_TRUNCATED],
        "num_timed_out": statuses[STATUS_TIMED_OUT],
        "status_counts": dict(sorted(statuses.items())),
        "num_output_tokens": num_output_tokens,
        "output_tokens_per_s": num_output_tokens / duration_s if duration_s > 0 else None,
        "mean_token_ms": (1000 * sum(r.e2e_s for r in completed if r.e2e_s is not None) / num_output_tokens
                          if num_output_tokens else None),
        "requests_per_s": len(completed) / duration_s if duration_s > 0 else None,
        "ttft_ms": latency_stats_ms([r.ttft_s for r in completed if r.ttft_s is not None]),
        "itl_ms": latency_stats_ms([gap for r in completed for gap in r.itl_s]),
        "tpot_ms": latency_stats_ms([r.tpot_s for r in completed if r.tpot_s is not None]),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in completed if r.e2e_s is not None]),
    }


def format_comparison(summary: dict, peer: dict) -> str:
    """One run against two servers: ratios > 1 mean the first target is better."""
    def ratio(numerator, denominator):
        return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"
    return (f"vs peer {peer['config'].get('base_url')}: mean token time {_fmt(summary['mean_token_ms'])} vs "
            f"{_fmt(peer['mean_token_ms'])} ms (ratio peer/this {ratio(peer['mean_token_ms'], summary['mean_token_ms'])}), "
            f"TTFT p50 {_fmt(summary['ttft_ms']['p50'])} vs {_fmt(peer['ttft_ms']['p50'])} ms, "
            f"output tokens/s {_fmt(summary['output_tokens_per_s'])} vs {_fmt(peer['output_tokens_per_s'])} "
            f"(ratio this/peer {ratio(summary['output_tokens_per_s'], peer['output_tokens_per_s'])})")


def is_nothing_lost(summary: dict) -> bool:
    """The run's pass criterion: no dropped or truncated stream and no request left unfinished."""
    return summary["num_lost"] == 0 and summary["num_timed_out"] == 0


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    s = summary
    http = ", ".join(f"{code}: {n}" for code, n in s["http_status_counts"].items()) or "none"
    lines = [
        "=" * 22 + " load test " + "=" * 22,
        f"target             {s['config'].get('base_url', '?')} ({s['config'].get('endpoint', '?')}, "
        f"model {s['config'].get('model', '?')})",
        f"requests           {s['num_requests']}   completed {s['num_completed']}   "
        f"disconnected (on purpose) {s['num_disconnected']}",
        f"HTTP errors        4xx {s['num_http_4xx']}   5xx {s['num_http_5xx']}   (by code: {http})",
        f"stream errors      {s['num_stream_errors']}   timed out {s['num_timed_out']}",
        f"LOST               {s['num_lost']}   (dropped {s['num_dropped']}, truncated {s['num_truncated']})",
        f"duration           {_fmt(s['duration_s'], 2)} s",
        f"output tokens      {s['num_output_tokens']}   ({_fmt(s['output_tokens_per_s'])} tokens/s, "
        f"{_fmt(s['requests_per_s'], 2)} requests/s)",
        "",
        f"{'latency (ms)':<14}{'count':>7}{'mean':>10}" + "".join(f"{'p' + str(q):>10}" for q in PERCENTILES),
    ]
    for key, label in LATENCY_METRICS:
        stats = s[key]
        lines.append(f"{label:<14}{stats['count']:>7}{_fmt(stats['mean']):>10}"
                     + "".join(f"{_fmt(stats[f'p{q}']):>10}" for q in PERCENTILES))
    lines.append("=" * 55)
    return "\n".join(lines)


def write_report_json(path: Path, summary: dict, results: list[RequestResult], *, is_detailed: bool = False) -> None:
    """Summary at the top level, one record per request under "requests"."""
    report = {**summary, "requests": [r.to_record(is_detailed=is_detailed) for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
