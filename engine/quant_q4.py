"""4-bit (and 8-bit) weights on the project's AVX2 / VNNI kernel (engine/kernels/q4_matmul.c): the CPU `int4` layer.

    layer = GroupedLinear(linear, quantize_int4(linear.weight))     # groups of 32: fp16 step and minimum each
    layer = GroupedLinear(linear, quantize_uint8_groups(linear.weight), num_bits=8)  # 256 levels per group
    y = layer(x)                                                    # x [..., K] -> y [..., N], fp32 inside
    y = layer(x, norm_weight, eps)                                  # of RMSNorm(x): the norm in the kernel
    y = layer(gate_up, is_gated=True)                               # of silu(gate) * up, gate_up [..., 2K]

Why: a one-token forward streams every weight once, so its time is bytes / memory bandwidth. This
layer reads 5 bits per weight (4 + a fp16 step and minimum per 32) against fbgemm's 8, takes each
group of 32 activations of a row as int8 on the group's own scale (llama.cpp's Q8 activations take
one scale per 256), and sums each group exactly in integers; aten's int4 CPU kernel reads 4.5 bits
but is compute-bound on AVX2 (3-4x fbgemm's time). 8-bit weights (two 4-bit planes, 9 bits per
weight read) serve `int4-mixed`'s layers that lie on no 4-bit grid. The C file is compiled on first
use with the machine's C compiler (`cc`, ~1 s) into `~/.cache/amusd/kernels/`, with VNNI where the
CPU has it (AVX512-VNNI or AVX-VNNI: one vpdpbusd for AVX2's three integer ops, the same sums, so
the same outputs bit for bit; on an AMX Xeon a 1536 x 17920 matmul at 4 rows 0.55 vs 0.86 ms,
cache-warm); where there is no compiler, no AVX2 / FMA / F16C, or the build fails, `available()` says why and `int4` takes aten's
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
# builds of the same source, best first: (name, /proc/cpuinfo flags it needs, extra compiler flags).
# The VNNI builds sum the same integers in fewer ops, the AVX-512 one two blocks of 8 outputs per
# register, the AMX one sums calls of several rows on tiles (bit-equal outputs; see the C file and
# kernels/q4_wide.h, q4_amx.h, which it includes).
BUILDS = (("amx", ("amx_int8", "amx_tile", "avx512_vnni", "avx512vl", "avx512bw"),
           ("-mavx512vnni", "-mavx512vl", "-mavx512bw", "-mamx-tile", "-mamx-int8")),
          ("avx512-vnni", ("avx512_vnni", "avx512vl", "avx512bw"), ("-mavx512vnni", "-mavx512vl", "-mavx512bw")),
          ("avx-vnni", ("avx_vnni",), ("-mavxvnni",)),
          ("avx2", (), ()))
GROUP_SIZE = 32
BLOCK_ROWS = 8                         # outputs the kernel computes side by side


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("AMUSD_KERNEL_CACHE", Path.home() / ".cache" / "amusd" / "kernels"))


def runnable_builds() -> tuple[str, ...]:
    """The builds this CPU runs, best first (empty without AVX2 / FMA / F16C)."""
    flags = cpu_flags()
    if any(flag not in flags for flag in REQUIRED_FLAGS):
        return ()
    return tuple(name for name, needed, _ in BUILDS if all(flag in flags for flag in needed))


def _compile(compiler: str, extra_flags: tuple[str, ...], library: Path) -> str:
    """Builds the kernel into `library`; "" or why not."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            result = subprocess.run([compiler, *COMPILE_FLAGS, *extra_flags, str(SOURCE), "-o", str(built)],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                return f"{compiler} failed: {result.stderr.strip()[-500:]}"
            os.replace(built, library)          # atomic: concurrent workers never load a half-written file
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot build into {library.parent}: {error}"
    return ""


def _built(name: str) -> tuple[Path, str]:
    """(the shared library of build `name`, "" or why it could not be built), compiling it once."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    extra_flags = next(flags for build, _, flags in BUILDS if build == name)
    source = b"".join(path.read_bytes() for path in sorted(SOURCE.parent.glob("q4_*")))   # the .c and its .h
    digest = hashlib.sha256(source + " ".join(COMPILE_FLAGS + extra_flags).encode()).hexdigest()[:16]
    library = kernel_cache_dir() / f"q4_matmul-{name}-{digest}.so"
    if library.exists():
        return library, ""
    if compiler is None:
        return library, "no C compiler (cc / gcc) on PATH"
    return library, _compile(compiler, extra_flags, library)


def prebuild() -> dict[str, str]:
    """Compiles every build, whatever this CPU runs (an image built on one machine, run on others):
    build name -> "built" or why not."""
    return {name: _built(name)[1] or "built" for name, _, _ in BUILDS}


@functools.lru_cache(maxsize=None)
def _load(build: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not). build: a name in BUILDS, or None for the best this CPU runs
    whose compile succeeds (a compiler without VNNI support falls back to the AVX2 build)."""
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    runnable = runnable_builds()
    if build is not None and build not in runnable:
        return None, f"this CPU cannot run the {build} build (it runs: {', '.join(runnable)})"
    why_not = ""
    for name in ((build,) if build else runnable):
        library, why_not = _built(name)
        if why_not:
            logger.info("4-bit kernel: the %s build failed, trying the next: %s", name, why_not)
            continue
        logger.debug("4-bit kernel: %s", library)
        lib = ctypes.CDLL(str(library))
        lib.q4_matmul.restype = ctypes.c_int
        lib.q4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
        lib.build_name = name
        return lib, ""
    return None, why_not


def build_name() -> str | None:
    """The build GroupedLinear runs here ("amx", "avx512-vnni", "avx-vnni", "avx2"), None if none."""
    lib = _load()[0]
    return None if lib is None else lib.build_name


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (None if it can)."""
    return _load()[1] or None


def available() -> bool:
    return _load()[0] is not None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] ints in [0, 15] -> [N / 8, 4 K] uint8, the kernel's layout: per block of 8 outputs and
    group g of 32, 4 x 32 bytes; byte (t, o, j) = q[o, 32 g + 8 t + j] | q[o, 32 g + 8 t + 4 + j] << 4."""
    n, k = q.shape
    nibbles = q.to(torch.uint8).reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // GROUP_SIZE, 4, 2, 4)   # [b, o, g, t, h, j]
    nibbles = nibbles.permute(0, 2, 3, 1, 5, 4)                                                 # [b, g, t, o, j, h]
    return (nibbles[..., 0] | nibbles[..., 1] << 4).reshape(n // BLOCK_ROWS, 4 * k).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: [N / 8, 4 K] uint8 -> q [N, K] uint8."""
    num_blocks, width = packed.shape
    k = width // 4
    bytes_ = packed.reshape(num_blocks, k // GROUP_SIZE, 4, BLOCK_ROWS, 4)                       # [b, g, t, o, j]
    nibbles = torch.stack([bytes_ & 15, bytes_ >> 4], dim=-1)                                   # [b, g, t, o, j, h]
    return nibbles.permute(0, 3, 1, 2, 5, 4).reshape(num_blocks * BLOCK_ROWS, k)


def pack_planes(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """4-bit q: pack_int4(q); 8-bit q: its low and high nibbles as two such planes, per block and group
    the low plane's 128 bytes, then the high plane's: [N / 8, 8 K]."""
    if num_bits == 4:
        return pack_int4(q)
    n, k = q.shape
    planes = [pack_int4(plane).reshape(n // BLOCK_ROWS, k // GROUP_SIZE, 128) for plane in (q & 15, q >> 4)]
    return torch.stack(planes, dim=2).reshape(n // BLOCK_ROWS, 8 * k)


def unpack_planes(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """pack_planes' inverse."""
    if num_bits == 4:
        return unpack_int4(packed)
    num_blocks, width = packed.shape
    planes = packed.reshape(num_blocks, width // 256, 2, 128)
    low, high = (unpack_int4(planes[:, :, i].reshape(num_blocks, width // 2)) for i in range(2))
    return low | high << 4


def interleave_blocks(per_group: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N / 8, G, 8]: each block's 8 outputs side by side per group (steps, minimums)."""
    n, g = per_group.shape
    return per_group.reshape(n // BLOCK_ROWS, BLOCK_ROWS, g).transpose(1, 2).contiguous()


def can_take(out_features: int, in_features: int) -> str | None:
    """Why the kernel cannot take an [out, in] weight (None if it can): K must be whole groups of 32
    (N is padded to whole blocks of 8 outputs by GroupedLinear)."""
    if in_features % GROUP_SIZE:
        return f"the 4-bit kernel takes K in whole groups of {GROUP_SIZE}, got K={in_features}"
    return None


def quantize_uint8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] in [0, 255], steps [N, G], minimums [N, G]): 256 levels from each group of
    32's minimum to its maximum (w ~ minimum + q * step)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    minimums = groups.amin(dim=2)
    steps = ((groups.amax(dim=2) - minimums) / 255).to(torch.float16).float()      # the step the kernel reads
    minimums = minimums.to(torch.float16).float()
    q = ((groups - minimums[..., None]) / steps.clamp(min=1e-30)[..., None]).round().clamp(0, 255)
    return q.reshape(n, k).to(torch.uint8), steps, minimums


class GroupedLinear(nn.Module):
    """y = x W^T + b with W[n, 32 g + i] = steps[n, g] * q[n, 32 g + i] + mins[n, g] (fp16 step and minimum),
    q 4-bit or 8-bit."""

    def __init__(self, linear: nn.Linear, groups: tuple, num_bits: int = 4, build: str | None = None):
        """groups: (q [N, K], steps [N, G], mins [N, G], ...): engine.int4_grids.quantize_int4(linear.weight)
        for 4 bits, quantize_uint8_groups(linear.weight) for 8. build: which of BUILDS runs it (None:
        the best here)."""
        super().__init__()
        if num_bits not in (4, 8):
            raise ValueError(f"the kernel takes 4- or 8-bit weights, got {num_bits}")
        q, steps, mins = groups[:3]
        self.num_bits = num_bits
        self.out_features, self.in_features = q.shape
        reason = can_take(self.out_features, self.in_features)
        if reason:
            raise ValueError(reason)
        num_padding = -self.out_features % BLOCK_ROWS             # outputs of q = step = min = 0, sliced off
        self.num_kernel_outputs = self.out_features + num_padding
        def padded(per_row: torch.Tensor) -> torch.Tensor:
            return torch.cat([per_row, per_row.new_zeros(num_padding, per_row.shape[1])]) if num_padding else per_row
        self.register_buffer("packed", pack_planes(padded(q), num_bits))                           # [N / 8, 4 K per plane]
        self.register_buffer("steps", interleave_blocks(padded(steps.to(torch.float16))))          # [N / 8, G, 8]
        self.register_buffer("mins", interleave_blocks(padded(mins.to(torch.float16))))
        bias = None if linear.bias is None else padded(linear.bias.detach().float()[:, None])[:, 0].contiguous()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._lib, why_not = _load(build)
        if self._lib is None:
            raise RuntimeError(f"the 4-bit CPU kernel cannot run here: {why_not}")
        self._weight_pointers: tuple | None = None      # the buffers' addresses, taken once per placement

    def _apply(self, fn, *args, **kwargs):
        self._weight_pointers = None                    # .to() / share_memory() may move the buffers
        return super()._apply(fn, *args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """W [N, K] fp32, as the kernel sees it (for tests and quality checks)."""
        def per_weight(per_block: torch.Tensor) -> torch.Tensor:                         # [N / 8, G, 8] -> [N, K]
            per_group = per_block.float().transpose(1, 2).reshape(self.num_kernel_outputs, -1)
            return per_group.repeat_interleave(GROUP_SIZE, dim=1)
        weight = unpack_planes(self.packed, self.num_bits).float() * per_weight(self.steps) + per_weight(self.mins)
        return weight[:self.out_features]

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                is_gated: bool = False) -> torch.Tensor:
        """x [..., K] -> [..., N]. A prologue the kernel takes as it quantizes x, in place of tensor ops:
        norm_weight (fp32 [K]): of the Llama-family RMSNorm of x, norm_weight * x / sqrt(mean(x^2) + norm_eps);
        is_gated: x is [..., 2 K] (gate | up), of silu(gate) * up (an MLP's down projection)."""
        shape, dtype = x.shape, x.dtype
        if is_gated and norm_weight is not None:
            raise ValueError("a gated input takes no norm")
        rows = x.reshape(-1, 2 * self.in_features if is_gated else self.in_features)
        rows = rows if rows.dtype == torch.float32 and rows.is_contiguous() else rows.float().contiguous()
        num_rows = rows.shape[0]
        if self._weight_pointers is None:
            self._weight_pointers = (self.packed.data_ptr(), self.steps.data_ptr(), self.mins.data_ptr(),
                                     None if self.bias is None else self.bias.data_ptr())
        packed, steps, mins, bias = self._weight_pointers
        if norm_weight is not None and (norm_weight.dtype != torch.float32 or norm_weight.shape != (self.in_features,)
                                        or not norm_weight.is_contiguous()):
            raise ValueError(f"norm_weight must be contiguous fp32 [{self.in_features}], got "
                             f"{norm_weight.dtype} {tuple(norm_weight.shape)}")
        y = torch.empty(num_rows, self.num_kernel_outputs)
        status = self._lib.q4_matmul(rows.data_ptr(), num_rows, self.in_features, packed, steps, mins, bias,
                                     y.data_ptr(), self.num_kernel_outputs, self.num_bits // 4,
                                     None if norm_weight is None else norm_weight.data_ptr(), norm_eps, int(is_gated))
        if status != 0:
            raise RuntimeError(f"q4_matmul failed ({'out of memory' if status == -2 else 'bad sizes'}): "
                               f"{num_rows} x {self.in_features} by {self.out_features}")
        if self.num_kernel_outputs != self.out_features:
            y = y[:, :self.out_features].contiguous()
        return (y if dtype == torch.float32 else y.to(dtype)).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.num_bits}, kernel=q4_matmul ({self._lib.build_name})"
