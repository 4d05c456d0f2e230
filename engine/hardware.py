"""What the hardware runs natively, and the `auto` defaults that follow (torch-free).

    resolve_dtype("auto", "cpu")            -> ("float32", "CPU has no native bf16 matmul (avx2 only): ...")
    resolve_quantization("auto", "cpu", "float32", role="verify") -> ("int8", "...")

int8 kernel: oneDNN's AMX int8 tiles where the CPU has them, else fbgemm (default_int8_kernel).
dtype auto: bf16 on CUDA and on CPUs with native bf16 matmul (AVX512_BF16 or AMX-BF16); fp32
elsewhere. Without native bf16 a bf16 matmul over k tokens costs ~k one-token matmuls (the CPU
converts and runs fp32 without blocking over tokens), which breaks speculation's premise. Under
fbgemm's int8 layers (CPU `int8` / `int8-fast`, which `auto` picks there) dtype auto is fp32 on every
CPU: those layers take fp32 activations, so bf16 only adds two casts per linear (measured on an
AVX512_BF16 EPYC, lean decoder, one core: 1.5B int8 one-token forward 75 ms fp32 vs 102 ms bf16,
0.5B int8-fast 37 vs 48 ms, equal at 2-8 tokens).
quantization auto: on CPU the verify gets `int4-mixed` where the 4-bit kernel builds with VNNI
(VNNI_BUILDS) or on AVX2-class CPUs (is_avx2_class), else `int8` (accurate W8A8), and the draft `nf4` where it runs
(AVX512_BF16 and bitsandbytes: a one-token draft forward 29 vs 43 ms for `int8-fast` on an
AVX512_BF16 EPYC, 2 threads), else `int8-fast`; on CUDA nothing (bf16 matmuls are what GPUs run
best); float64 (an exactness setting) is never quantized. Under `nf4` dtype auto is fp32 too (its
one-token forward: 29 ms fp32 vs 38 ms bf16, same CPU).
"""
from __future__ import annotations

import functools
import importlib.util
import platform
from typing import Callable

X86_64_MACHINES = ("x86_64", "amd64", "AMD64")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
SIMD_FLAGS = ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_summary() -> dict:
    """Model name, architecture and the SIMD flags that decide kernels (for logs, /health, bench JSON)."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags()
    return {"model_name": name or platform.processor(), "arch": platform.machine(),
            "simd": [flag for flag in SIMD_FLAGS if flag in flags], "has_native_bf16": has_native_bf16()}


def has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


FP32_ACTIVATION_SCHEMES = ("auto", "int8", "int8-fast", "int4", "int4-mixed", "nf4")   # CPU layers fastest under fp32
Q4_KERNEL_FLAGS = ("avx2", "fma", "f16c")                   # engine/kernels/q4_matmul.c


def resolve_dtype(dtype: str, device: str, quantization: str = "none") -> tuple[str, str]:
    """(concrete dtype, why) for a configured dtype on a device, under the configured quantization."""
    if dtype != "auto":
        return dtype, "set in the configuration"
    if device.startswith("cuda"):
        return "bfloat16", "CUDA runs bf16 natively"
    if quantization in FP32_ACTIVATION_SCHEMES:
        return "float32", "CPU quantized layers (int8 / int4 / nf4) run fastest under fp32 activations"
    flags = cpu_flags()
    if has_native_bf16():
        found = ", ".join(flag for flag in BF16_FLAGS if flag in flags)
        return "bfloat16", f"CPU has native bf16 matmul ({found})"
    simd = next((flag for flag in SIMD_FLAGS if flag in flags), "no AVX")
    return "float32", (f"CPU has no native bf16 matmul (best SIMD: {simd}): bf16 over k tokens would cost "
                       "~k one-token forwards, so fp32 under quantized weights")


def resolve_quantization(quantization: str, device: str, dtype: str, role: str,
                         q4_kernel_build: Callable[[], str | None] = lambda: None) -> tuple[str, str]:
    """(concrete scheme, why) for a configured quantization of the verify or draft model.

    q4_kernel_build: which build of the 4-bit kernel runs here, "amx" / "avx512-vnni" / "avx-vnni" / "avx2" or
    None (engine.quant_q4.build_name, which needs torch and a compiler); asked for a CPU verify under auto."""
    if quantization != "auto":
        return quantization, "set in the configuration"
    if dtype == "float64":
        return "none", "float64 asks for exact arithmetic"
    if device.startswith("cuda"):
        return "none", "GPUs run bf16 matmuls at full speed"
    if role == "draft":
        if nf4_unavailable_reason("nf4", device) is None:
            return "nf4", "CPU draft with AVX512_BF16: NF4 reads half int8's bytes (its errors only cost acceptance)"
        return "int8-fast", "CPU draft: the fastest int8 scheme (its errors only cost acceptance)"
    build = q4_kernel_build()
    if build in VNNI_BUILDS or (build == "avx2" and is_avx2_class()):
        return "int4-mixed", (f"CPU verify on the 4-bit kernel's {build} build: 4-bit-grid layers (a Q4_K GGUF's) "
                              "re-encoded exactly (5 bits per weight against int8's 8), 256 levels per group for "
                              "the others, int8 for the output layer")
    return "int8", "CPU verify: W8A8 with per-token ~14-bit activations (int8 weight-only accuracy)"


# engine/quant_q4.py: BUILDS (that module needs torch). Where one of these runs, `auto` takes
# `int4-mixed` for the verify (AMX Xeon, 2 threads, default pair, AVX-512 build: one-token verify
# pass 66 vs 93 ms for int8 on oneDNN's AMX tiles, 4 tokens 78 vs 99, 8 sequences x 1 token 122 vs
# 125, 8 x 4 tokens 305 vs 212; the amx build, many rows on tiles too: 8 x 4 tokens 216-221).
VNNI_BUILDS = ("amx", "avx512-vnni", "avx-vnni")


def is_avx2_class() -> bool:
    """AVX2 / FMA / F16C and nothing wider (no AVX-512, no AMX): where the 4-bit kernel's AVX2 build
    was measured to beat fbgemm's int8 at every batch size (Zen 1 EPYC, 2 threads: a 1536 x 17920
    matmul 1.22 vs 2.17 ms at one token, 5.8 vs 12.6 ms at 8). On AVX-512 CPUs without VNNI the AVX2
    build was not measured, so `auto` keeps int8 there."""
    flags = cpu_flags()
    return all(flag in flags for flag in Q4_KERNEL_FLAGS) and not any(
        flag in flags for flag in ("avx512f", "amx_int8", "amx_bf16"))


def nf4_unavailable_reason(quantization: str, device: str) -> str | None:
    """Why scheme `nf4` cannot run on `device` here (None if it can, or if the scheme is another)."""
    if quantization != "nf4":
        return None
    if not device.startswith("cpu"):
        return "a CPU scheme (bitsandbytes' AVX512_BF16 kernel); on CUDA use none"
    if "avx512_bf16" not in cpu_flags():
        simd = next((flag for flag in SIMD_FLAGS if flag in cpu_flags()), "no AVX")
        return f"needs a CPU with AVX512_BF16 (this one's best SIMD: {simd}); use int8-fast"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes: pip install bitsandbytes"
    return None


INT8_KERNELS = ("fbgemm", "onednn")


def default_int8_kernel() -> str:
    """The kernel under the CPU int8 schemes: oneDNN where AMX int8 tiles exist, else fbgemm.

    With AMX a matmul over up to ~16 rows costs about what one row does. The default pair's verify
    (`int8`, 300-token contexts, 2 threads, Xeon with AMX; `python -m engine.batch_cost --int8-kernels
    fbgemm,onednn`): 1 token 86.6 vs 85.5 ms, 4 tokens 117.6 vs 91.4, 8 sequences x 1 token 156.5 vs
    114.6, 8 x 4 323.9 vs 195.7 (fbgemm vs oneDNN). Without AMX (VNNI / AVX2) fbgemm is kept: the
    kernel measured there.
    """
    return "onednn" if "amx_int8" in cpu_flags() else "fbgemm"


def has_ordered_stores(machine: str | None = None) -> bool:
    """x86-64 (TSO): plain stores become visible to other processes in program order."""
    return (machine or platform.machine()) in X86_64_MACHINES


def check_memory_ordering(config, machine: str | None = None) -> None:
    """Refuse async where stores may become visible out of order (aarch64 & co): ConfigError.

    The async protocol (engine/async_decode.py) publishes tokens, then counters, with plain stores
    into shared memory; x86-64 keeps that order for other processes, weaker memory models do not.
    """
    from engine.config import ConfigError
    if config.uses_draft_worker and not has_ordered_stores(machine):
        raise ConfigError(f"mode {config.mode!r} needs an x86-64 host: its shared-memory protocol relies on "
                          f"x86-64 store ordering and this host is {machine or platform.machine()}; "
                          "use --mode ar or sync here")
