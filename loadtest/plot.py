"""PNG of a load run (matplotlib, Agg backend; imported only when --plot is given).

    write_plot(outcome, Path("loadtest.png"))

Four panels: TTFT, inter-token latency and end-to-end latency histograms of completed
requests, and streamed chunks per second over the run with the number of requests in flight.
"""
from __future__ import annotations

from pathlib import Path

from loadtest.client import STATUS_COMPLETED
from loadtest.runner import LoadOutcome


def write_plot(outcome: LoadOutcome, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    completed = [r for r in outcome.results if r.status == STATUS_COMPLETED]
    histograms = [
        ("time to first token", [r.ttft_s * 1000 for r in completed if r.ttft_s is not None]),
        ("inter-token latency", [gap * 1000 for r in completed for gap in r.itl_s]),
        ("end-to-end latency", [r.e2e_s * 1000 for r in completed if r.e2e_s is not None]),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for axis, (title, values_ms) in zip(axes.flat, histograms):
        if values_ms:
            axis.hist(values_ms, bins=40, color="tab:blue", alpha=0.8)
        axis.set_title(f"{title} (n={len(values_ms)})")
        axis.set_xlabel("ms")
        axis.set_ylabel("count")
    _plot_timeline(axes.flat[3], outcome)
    figure.suptitle(f"load test: {len(outcome.results)} requests, {len(completed)} completed, "
                    f"{outcome.duration_s:.1f} s")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_timeline(axis, outcome: LoadOutcome) -> None:
    """Chunks streamed per one-second bin, and requests in flight, over the run."""
    num_bins = max(1, int(outcome.duration_s) + 1)
    chunks_per_s = [0] * num_bins
    in_flight = [0] * num_bins
    for result in outcome.results:
        for t in result.chunk_times_s:
            chunks_per_s[min(int(t), num_bins - 1)] += 1
        if result.start_s is not None and result.e2e_s is not None:
            first, last = int(result.start_s), min(int(result.start_s + result.e2e_s), num_bins - 1)
            for second in range(first, last + 1):
                in_flight[second] += 1
    seconds = list(range(num_bins))
    axis.plot(seconds, chunks_per_s, color="tab:green", label="chunks/s")
    axis.set_xlabel("seconds since start")
    axis.set_ylabel("streamed chunks per second")
    axis.set_title("throughput over time")
    twin = axis.twinx()
    twin.plot(seconds, in_flight, color="tab:orange", label="requests in flight")
    twin.set_ylabel("requests in flight")
    axis.legend(loc="upper left")
    twin.legend(loc="upper right")
