"""What one linear layer costs on this CPU, per kernel and number of token rows: is it memory- or compute-bound?

    python -m engine.matmul_cost --threads 2 [--json out.json]

The default verify's two largest shapes (Qwen2.5-1.5B: the fused gate/up 1536 -> 17920 and down
8960 -> 1536), random weights, M = 1, 2, 4, 8 token rows, median of 30 calls each, under:

    int8        Int8DynamicLinear, two 7-bit activation digits (the verify's scheme)
    int8-fast   Int8DynamicLinear, one digit (the draft's)
    int8-onednn Int8DynamicLinear, two digits on oneDNN's kernel (the AMX default; elsewhere for comparison)
    int8-wo     PackedWeightOnlyLinear: aten's weight-only `_weight_int8pack_mm`, bf16 activations (CUDA's int8)
    int4        the 4-bit layer `int4` takes here: the 4-bit kernel (engine/quant_q4.py; its VNNI build where
                the CPU has VNNI) where it builds, else aten's `_weight_int4pack_mm_for_cpu`
    int4-avx2   the kernel's AVX2 build, where a VNNI build is the one `int4` takes
    fp32        nn.Linear

The JSON also holds each kernel's effective bandwidth at M = 1 (int8 weight bytes / time, whatever it reads): when a kernel runs
at the machine's memory speed there, its one-token cost is the bytes it reads, and a pass over more
tokens costs little more only where the kernel has compute to spare (what speculation relies on).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from engine import quant_q4
from engine.int4_grids import quantize_int4
from engine.quantization import Int8DynamicLinear, PackedWeightOnlyLinear, make_quantized

SHAPES = [(1536, 17920), (8960, 1536)]           # (in, out)
ROWS = (1, 2, 4, 8)
NUM_CALLS = 30


def median_ms(fn, x: torch.Tensor) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(NUM_CALLS):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 3)


def layer_kernels(linear: nn.Linear) -> dict:
    """The same layer under each kernel: name -> x [M, in] -> y [M, out]."""
    kernels = {"int8": Int8DynamicLinear(linear, 2), "int8-fast": Int8DynamicLinear(linear, 1),
               "int8-onednn": Int8DynamicLinear(linear, 2, "onednn"),
               "int8-wo": PackedWeightOnlyLinear(linear, "int8"), "int4": make_quantized(linear, "int4"), "fp32": linear}
    if quant_q4.build_name() not in (None, "avx2"):         # the VNNI build beside the AVX2 one it replaces
        kernels["int4-avx2"] = quant_q4.GroupedLinear(linear, quantize_int4(linear.weight.detach()), build="avx2")
    return kernels


def layer_costs(in_features: int, out_features: int) -> dict[str, dict[int, float]]:
    kernels = layer_kernels(nn.Linear(in_features, out_features, bias=False))
    costs: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for name, fn in kernels.items():
            costs[name] = {rows: median_ms(fn, torch.randn(rows, in_features)) for rows in ROWS}
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"threads": args.threads, "rows": list(ROWS), "ms_median": {}, "int8_gb_per_s_at_one_row": {}}
    for in_features, out_features in SHAPES:
        shape = f"{in_features}x{out_features}"
        costs = layer_costs(in_features, out_features)
        results["ms_median"][shape] = costs
        results["int8_gb_per_s_at_one_row"][shape] = {
            name: round(in_features * out_features / (1e6 * by_rows[1]), 1) for name, by_rows in costs.items()}
        for name, by_rows in costs.items():
            print(f"{shape:>11} {name:>9}: " + "  ".join(f"M={m} {ms:7.2f} ms" for m, ms in by_rows.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
