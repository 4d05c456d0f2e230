"""Turning raw benchmark samples into the JSON report, the table and the tokens-over-time plot."""
from __future__ import annotations

import os
import platform
import time


def machine_info() -> dict:
    import torch
    import transformers
    from engine.hardware import cpu_summary
    cpu = cpu_summary()
    return {"cpu_model": cpu["model_name"] or "unknown", "cpu": cpu, "num_cores": os.cpu_count(), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _sum(samples, key) -> float:
    return sum(s["stats"].get(key, 0) for s in samples)


def summarise(raw: dict, parsed: dict, reference: str | None) -> dict:
    methods = {}
    for method, samples in raw.items():
        num_tokens = sum(len(s["token_ids"]) for s in samples)
        total_s = sum(s["elapsed_s"] for s in samples)
        first_token_s = sorted(s["token_times_s"][0] for s in samples if s["token_times_s"])
        entry = {"num_samples": len(samples), "num_tokens": num_tokens, "total_s": round(total_s, 3),
                 "mean_token_ms": round(1000 * total_s / max(num_tokens, 1), 2),
                 "ttft_p50_ms": round(1000 * first_token_s[len(first_token_s) // 2], 1) if first_token_s else None}
        if reference and parsed[method][0] != "peer":
            ref_samples = raw[reference]
            identical = [s["token_ids"] == r["token_ids"] for s, r in zip(samples, ref_samples)]
            entry["num_identical_to_ar"] = sum(identical)
            entry["differences"] = [{"sample": i, "first_diff_position": _first_diff(s["token_ids"], r["token_ids"])}
                                    for i, (s, r, same) in enumerate(zip(samples, ref_samples, identical)) if not same]
        name = parsed[method][0]
        if name in ("sync", "async"):
            num_draft = _sum(samples, "num_draft_tokens")
            num_steps = _sum(samples, "num_verify_steps")
            num_draft_produced = _sum(samples, "num_draft_tokens_produced")
            entry.update({
                "acceptance_rate": round(_sum(samples, "num_accepted_tokens") / max(num_draft, 1), 4),
                "tokens_per_verify": round(_sum(samples, "num_generated_tokens") / max(num_steps, 1), 3),
                "num_rollbacks": int(_sum(samples, "num_rollbacks")),
                "num_lookup_tokens": int(_sum(samples, "num_lookup_tokens")),
                "num_lookup_accepted": int(_sum(samples, "num_lookup_accepted")),
                "num_draft_tokens": int(num_draft),
                "num_draft_tokens_wasted": int(_sum(samples, "num_draft_tokens_wasted")),
                "mean_draft_lead": round(_sum(samples, "sum_draft_lead") / max(num_steps, 1), 3),
                "draft_tokens_per_forward": round(num_draft_produced / max(_sum(samples, "num_draft_forwards"), 1), 3),
                "verify_busy_fraction": round(_sum(samples, "verify_busy_s") / max(total_s, 1e-9), 3),
                "draft_busy_fraction": round(_sum(samples, "draft_busy_s") / max(total_s, 1e-9), 3),
            })
        methods[method] = entry
    for method, entry in methods.items():
        baselines = {m: methods[m]["mean_token_ms"] / entry["mean_token_ms"] for m in methods
                     if parsed[m][0] in ("ar", "sync", "hf", "peer") and m != method}
        entry["speedups"] = {m: round(v, 3) for m, v in baselines.items()}
        if reference:
            entry["speedup_vs_ar"] = round(methods[reference]["mean_token_ms"] / entry["mean_token_ms"], 3)
    return methods


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def first_difference_gaps(report: dict, raw: dict, reference: str, prompts, verify_dir: str, dtype: str,
                          quantization: str = "none") -> None:
    """Add the verify model's top-2 logit gap at each first differing position (one forward each).

    The model is loaded as the engine's verify worker loads it (same dtype and quantization).
    """
    import torch

    from engine import quant_q4
    from engine.hardware import resolve_dtype, resolve_quantization
    from engine.models import load_causal_lm
    todo = [(m, d) for m, e in report["methods"].items() for d in e.get("differences", [])]
    if not todo:
        return
    concrete_dtype = resolve_dtype(dtype, "cpu", quantization)[0]
    model = load_causal_lm(verify_dir, None, "cpu", concrete_dtype,
                           resolve_quantization(quantization, "cpu", concrete_dtype, "verify", quant_q4.build_name)[0])
    with torch.inference_mode():
        for method, diff in todo:
            i, pos = diff["sample"], diff["first_diff_position"]
            ref_ids = raw[reference][i]["token_ids"]
            context = prompts[i] + ref_ids[:pos]
            logits = model(torch.tensor([context])).logits[0, -1].float()
            top2 = logits.topk(2)
            diff["top2_logit_gap"] = round(float(top2.values[0] - top2.values[1]), 5)
            diff["ar_token"] = ref_ids[pos] if pos < len(ref_ids) else None
            diff["method_token"] = raw[method][i]["token_ids"][pos] if pos < len(raw[method][i]["token_ids"]) else None


def print_table(report: dict) -> None:
    cols = ["method", "ms/token", "TTFT p50", "vs ar", "vs peer", "identical", "accept", "tok/verify", "rollbacks", "wasted",
            "verify busy", "draft busy"]
    rows = []
    for method, e in report["methods"].items():
        rows.append([method, f"{e['mean_token_ms']:.1f}", _fmt(e, "ttft_p50_ms"),
                     f"{e.get('speedup_vs_ar', float('nan')):.2f}x",
                     f"{e['speedups']['peer']:.2f}x" if "peer" in e["speedups"] else "-",
                     f"{e.get('num_identical_to_ar', '-')}/{e['num_samples']}",
                     _fmt(e, "acceptance_rate"), _fmt(e, "tokens_per_verify"), _fmt(e, "num_rollbacks"),
                     _fmt(e, "num_draft_tokens_wasted"), _fmt(e, "verify_busy_fraction"), _fmt(e, "draft_busy_fraction")])
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    print(f"machine: {report['machine']['cpu_model']}, {report['machine']['num_cores']} cores, "
          f"torch {report['machine']['torch_version']}")
    for row in [cols] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    for method, e in report["methods"].items():
        for d in e.get("differences", []):
            print(f"  {method}: sample {d['sample']} differs from ar at token {d['first_diff_position']}"
                  + (f", verify top-2 logit gap {d['top2_logit_gap']}" if "top2_logit_gap" in d else ""))


def _fmt(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def write_plot(raw: dict, path: str) -> None:
    """Tokens generated over time, per method, for the first prompt (the paper's Figure 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, samples in raw.items():
        times = samples[0]["token_times_s"]
        ax.step(times, range(1, len(times) + 1), where="post", label=method)
    ax.set_xlabel("time since request start (s)")
    ax.set_ylabel("tokens generated")
    ax.set_title("Tokens over time, first prompt")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
