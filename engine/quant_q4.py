"""4-bit weights on the project's AVX2 kernel (engine/kernels/q4_matmul.c): the CPU `int4` layer.

    layer = Q4Linear(linear, quantize_int4(linear.weight))   # groups of 32: fp16 step and minimum each
    y = layer(x)                                             # x [..., K] -> y [..., N], fp32 inside

Why: a one-token forward streams every weight once, so its time is bytes / memory bandwidth. This
layer reads 5 bits per weight (4 + a fp16 step and minimum per 32) against fbgemm's 8, takes each
row's activations as 15-bit integers on the row's own scale (finer than bf16; the int8 layer's two
digits give ~14 bits), and sums each group exactly in int32; aten's int4 CPU kernel reads 4.5 bits
but is compute-bound on AVX2 (3-4x fbgemm's time). The C file is compiled on first
use with the machine's C compiler (`cc`, ~1 s) into `~/.cache/amusd/kernels/`; where there is no
compiler, no AVX2 / FMA / F16C, or the build fails, `available()` says why and `int4` takes aten's
kernel instead (engine/quantization.py).

Threads: the kernel's OpenMP loop runs on the libgomp that torch has loaded (the same runtime,
so torch.set_num_threads applies to it and no second pool spins beside torch's).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from engine.hardware import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "q4_matmul.c"
REQUIRED_FLAGS = ("avx2", "fma", "f16c")
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-lm")
GROUP_SIZE = 32


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("AMUSD_KERNEL_CACHE", Path.home() / ".cache" / "amusd" / "kernels"))


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not)."""
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc / gcc) on PATH"
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    library = kernel_cache_dir() / f"q4_matmul-{digest}.so"
    if not library.exists():
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
                built = Path(scratch) / library.name
                result = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(built)],
                                        capture_output=True, text=True, timeout=300)
                if result.returncode != 0:
                    return None, f"{compiler} failed: {result.stderr.strip()[-500:]}"
                os.replace(built, library)      # atomic: concurrent workers never load a half-written file
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"cannot build into {library.parent}: {error}"
    logger.debug("4-bit kernel: %s", library)
    lib = ctypes.CDLL(str(library))
    lib.q4_matmul.restype = ctypes.c_int
    lib.q4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib, ""


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (None if it can)."""
    return _load()[1] or None


def available() -> bool:
    return _load()[0] is not None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] ints in [0, 15] -> [N, K / 2] uint8, the kernel's layout: per 64 weights, 16 little-endian
    16-bit lanes, lane l = q[l] | q[16 + l] << 4 | q[32 + l] << 8 | q[48 + l] << 12."""
    n, k = q.shape
    quarters = q.to(torch.uint8).reshape(n, k // 64, 4, 16)                      # [N, pairs, i, l]
    low_bytes = quarters[:, :, 0] | quarters[:, :, 1] << 4                        # lane l's first byte
    high_bytes = quarters[:, :, 2] | quarters[:, :, 3] << 4
    return torch.stack([low_bytes, high_bytes], dim=3).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: [N, K / 2] uint8 -> q [N, K] uint8."""
    n, half_k = packed.shape
    lanes = packed.reshape(n, half_k // 32, 16, 2)                                # [N, pairs, l, byte]
    quarters = torch.stack([lanes[..., 0] & 15, lanes[..., 0] >> 4, lanes[..., 1] & 15, lanes[..., 1] >> 4], dim=2)
    return quarters.reshape(n, half_k * 2)


class Q4Linear(nn.Module):
    """y = x W^T + b with W[n, 32 g + i] = steps[n, g] * q[n, 32 g + i] + mins[n, g] (fp16 step and minimum)."""

    def __init__(self, linear: nn.Linear, int4_groups: tuple):
        """int4_groups: engine.int4_grids.quantize_int4(linear.weight): (q [N, K], steps [N, G], mins [N, G])."""
        super().__init__()
        q, steps, mins = int4_groups[:3]
        self.out_features, self.in_features = q.shape
        if self.in_features % (2 * GROUP_SIZE):
            raise ValueError(f"the 4-bit kernel takes K in whole pairs of groups (a multiple of 64), got {self.in_features}")
        self.register_buffer("packed", pack_int4(q))
        self.register_buffer("steps", steps.to(torch.float16).contiguous())
        self.register_buffer("mins", mins.to(torch.float16).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().contiguous(),
                                                                 requires_grad=False)
        self._lib = _load()[0]
        if self._lib is None:
            raise RuntimeError(f"the 4-bit CPU kernel cannot run here: {_load()[1]}")

    def dequantized_weight(self) -> torch.Tensor:
        """W [N, K] fp32, as the kernel sees it (for tests and quality checks)."""
        q = unpack_int4(self.packed)
        step = self.steps.float().repeat_interleave(GROUP_SIZE, dim=1)
        return q.float() * step + self.mins.float().repeat_interleave(GROUP_SIZE, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, self.in_features)
        rows = rows if rows.dtype == torch.float32 and rows.is_contiguous() else rows.float().contiguous()
        num_rows = rows.shape[0]
        y = torch.empty(num_rows, self.out_features)
        status = self._lib.q4_matmul(rows.data_ptr(), num_rows, self.in_features, self.packed.data_ptr(),
                                     self.steps.data_ptr(), self.mins.data_ptr(),
                                     None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), self.out_features)
        if status != 0:
            raise RuntimeError(f"q4_matmul failed ({'out of memory' if status == -2 else 'bad sizes'}): "
                               f"{num_rows} x {self.in_features} by {self.out_features}")
        return (y if dtype == torch.float32 else y.to(dtype)).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel=q4_matmul (AVX2)"
