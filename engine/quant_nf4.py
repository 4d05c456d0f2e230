"""NF4 weight-only linears on bitsandbytes' CPU kernel: half int8's bytes per weight (scheme `nf4`).

    layer = Nf4Linear(linear)            # weights -> NF4, blocks of 64 along K, one bf16 absmax per block
    y = layer(x)                         # x [..., K] any float dtype -> y [..., N] in x's dtype

Why: a one-token forward on a CPU streams every weight once, so its time is bytes / bandwidth.
fbgemm's int8 reads 1 byte per weight; NF4 reads ~0.53 (4 bits + a bf16 scale per 64). bitsandbytes'
`gemv_4bit` CPU kernel (AVX512_BF16 builds: `gemv_4bit_inference_cpu_nf4_bf16`, any M rows despite
its name) dequantizes in registers and runs bf16 dot products: faster than int8 for a few rows
(0.5B one-token forward 29 vs 43 ms), compute-bound for many (a 300-token prefill 1009 vs 660 ms,
AVX512_BF16 EPYC, 2 threads). On CPUs without AVX512_BF16,
bitsandbytes' default implementation dequantizes the whole weight per call, which is correct but
slow and would not read this CPU layout, so `nf4` is refused there (engine/config.py, ConfigError).

Accuracy: NF4 is a 16-level normal-quantile grid scaled per block of 64; the default pair's GGUF
weights lie on Q4_K's affine grids of 32, which NF4 does not reproduce, so `nf4` adds error on top
of the GGUF's (teacher-forced KL: `python -m engine.quant_quality`). Meant for the draft, whose
errors only cost acceptance; a verify under `nf4` is lossless with respect to that NF4 model.

Row independence (a k-token verify equals k one-token forwards): each output row is the dot
products of its own input row; the kernel's tiling over M does not change a row's summation order
(tests/test_quantization.py checks bit equality).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

NF4_BLOCK_SIZE = 64
MAX_NF4_ROWS_BESIDE_AMX = 4           # a draft call with more rows takes its AMX int8 twin (measured below)
_CPU_BLOCK_N = 32                     # bitsandbytes' CPU layout packs output channels in tiles of 32


def import_bitsandbytes():
    """bitsandbytes, or ImportError saying how to install it (the `nf4` extra)."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)      # it warns that an optional hub kernel is absent; its own kernel runs
    try:
        import bitsandbytes
        from bitsandbytes import functional
    except ImportError as exc:
        raise ImportError("quantization 'nf4' needs bitsandbytes (the `models` extra): "
                          "pip install bitsandbytes") from exc
    finally:
        quiet.setLevel(level)
    return bitsandbytes, functional


def can_take(linear: nn.Linear) -> bool:
    """The kernel's layout needs N a multiple of 32 and K a multiple of the block size."""
    out_features, in_features = linear.weight.shape
    return out_features % _CPU_BLOCK_N == 0 and in_features % NF4_BLOCK_SIZE == 0


class Nf4Linear(nn.Module):
    """bitsandbytes NF4 weights (CPU-packed), bf16 activations; output in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        _, functional = import_bitsandbytes()
        if not functional.has_avx512bf16():
            raise RuntimeError("quantization 'nf4' runs on CPUs with AVX512_BF16 (bitsandbytes' CPU kernel); "
                               "this CPU has none: use int8 / int8-fast")
        weight = linear.weight.detach().to(torch.bfloat16)
        self.out_features, self.in_features = weight.shape
        packed, state = functional.quantize_4bit(weight, blocksize=NF4_BLOCK_SIZE, quant_type="nf4",
                                                 compress_statistics=False)
        packed, state = functional._convert_weight_packed_for_cpu(packed, state, _CPU_BLOCK_N)
        self.register_buffer("packed", packed)                 # [N, K/2] uint8
        self.register_buffer("absmax", state.absmax)           # [K/64, N] bf16
        self.register_buffer("code", state.code)               # the 16 NF4 levels
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)                 # [M, K]
        y = torch.ops.bitsandbytes.gemv_4bit(rows, self.packed, [self.out_features, self.in_features],
                                             self.absmax, self.code, NF4_BLOCK_SIZE)   # [M, N] bf16
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme=nf4, block={NF4_BLOCK_SIZE}"


class Nf4WithWideTwin(nn.Module):
    """A draft linear on AMX CPUs: NF4 for calls of up to `max_nf4_rows` rows, an int8 twin above.

    bitsandbytes' kernel grows with the rows where oneDNN's AMX int8 stays nearly flat: the 0.5B
    draft (300-token contexts, 2 threads, Xeon with AMX; `batch-cost-draft-nf4-vs-int8fast-onednn-amx.json`)
    costs 29 / 45 / 77 ms for 1 / 4 / 8 sequences x 1 token and 231 ms for 8 x 4 under NF4, against
    37 / 45 / 52 and 76 ms under `int8-fast`. So one-row draft steps read NF4's half bytes while
    batches and prefills take the twin (twice the draft's weight memory). A row's output then depends
    on how many rows share its call, so this is for the draft only: its q is kept from the very pass
    that sampled each token (never recomputed), so rejection sampling stays exact; a verify needs
    row independence and never gets a twin.
    """

    def __init__(self, nf4: Nf4Linear, wide: nn.Module, max_nf4_rows: int = MAX_NF4_ROWS_BESIDE_AMX):
        super().__init__()
        self.nf4, self.wide, self.max_nf4_rows = nf4, wide, max_nf4_rows
        self.out_features, self.in_features = nf4.out_features, nf4.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_rows = x.numel() // self.in_features
        return (self.nf4 if num_rows <= self.max_nf4_rows else self.wide)(x)
