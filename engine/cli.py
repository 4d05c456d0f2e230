"""`amusd` console script: one entry, five subcommands.

    amusd fetch-models [--cache-dir DIR]     download, verify and convert the default model pair
    amusd bench --methods ar:1,sync:1,async ...   the paper's experiment on this machine
    amusd humaneval --num-problems 164            greedy pass@1 of the verify model as served
    amusd serve [--config configs/default.yaml]   the OpenAI-compatible HTTP server
    amusd serve-ray [--config configs/ray.yaml]   the same server as Ray Serve replicas (extra: .[ray])

Each subcommand's module owns its own flags (`amusd SUB --help`); this file only dispatches,
importing lazily so that `amusd serve --help` does not load torch.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "fetch-models": ("engine.fetch", "download, verify and convert the default model pair"),
    "bench": ("engine.bench", "benchmark ar / sync / async / hf decoding (and a peer server)"),
    "humaneval": ("engine.humaneval", "greedy HumanEval pass@1 of the verify model (quantization's quality cost)"),
    "serve": ("server.main", "run the OpenAI-compatible HTTP server"),
    "serve-ray": ("server.ray_main", "run the server as autoscaled Ray Serve replicas (pip install -e .[ray])"),
}


def _usage() -> str:
    lines = ["usage: amusd {" + ",".join(SUBCOMMANDS) + "} [--help]", "", "subcommands:"]
    lines += [f"  {name:<14} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"amusd: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
