"""Quantized linear layers for a causal LM: aten's packed int8 / int4 matmuls and one AVX2 4-bit kernel.

    quantize_model(model, "int8")     every nn.Linear (lm_head included) -> a quantized module

Schemes (`verify_quantization` / `draft_quantization`):

    none       the model's own dtype
    int8       W8A8 on CPU: fbgemm (AVX2 / AVX512-VNNI), or oneDNN's AMX int8 tiles where the CPU has
               them (then ~16 rows cost what one does). Weights int8 per output channel.
               Activations quantized PER TOKEN in two 7-bit digits (~14 bits):
                   x[m] / s[m] = a[m] + b[m] / 126,   s[m] = max|x[m]| / 63,   a, b in [-63, 63]
                   y[m] = s[m] * (W a[m] + W b[m] / 126)           (one kernel call, rows [a; b])
               Accuracy of int8 weight-only (KL to fp32 ~1e-3 on the 1.5B), about 1.6x faster.
    int8-fast  the same with one 7-bit digit (a only): ~2x faster than `int8` at k = 8 tokens but
               lossier (KL ~3e-2): meant for the draft, whose errors only cost acceptance.
    int4       4-bit weights, groups of 32 along K. On CPUs with AVX2 / FMA / F16C: the project's kernel
               (engine/quant_q4.py: fp16 step and minimum per group, 5 bits per weight read; each
               group of 32 activations int8 on its own scale, as llama.cpp's Q8); elsewhere `_weight_int4pack_mm_for_cpu` / CUDA tinygemm
               (bf16 scales, bf16 activations). Each group's grid is the 4-bit grid its weights
               already lie on where they do (the default pair's weights are dequantized Q4_K_M
               blocks: 32 weights, one step and one minimum each, so int4 re-encodes those exactly
               up to fp16 / bf16 rounding of the step), else min/max.
    int4-mixed int4 for the layers whose weights lie on 4-bit grids (>= 90 % of their groups: the
               GGUF's Q4_K tensors); for the others (its Q6_K tensors: attn_v, ffn_down, the output
               layer) 256 levels per group of 32 on the same AVX2 kernel, `int8` for the output layer
               and where that kernel cannot run; so no weight is coarser than the GGUF's own. `auto` on AVX2-class
               CPUs and where the kernel's VNNI build runs (engine/hardware.py); for batches of 8 on
               AMX `int8` is ~10 % faster (docs: "Speed on the CPU you have").
    nf4        weight-only NF4 (blocks of 64) on bitsandbytes' CPU kernel, AVX512_BF16 CPUs only: half
               int8's bytes per weight, for the draft (engine/quant_nf4.py).
    int8 on CUDA: weight-only `_weight_int8pack_mm` (fbgemm is CPU-only).

Row independence (why a k-token verify equals k one-token forwards): every scale above belongs
to one token (row) or one weight channel, never to the whole [k, K] input. The digits go to
fbgemm as integer-valued floats with the activation scale given as exactly 1 and zero point 64
(`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`: `linear_dynamic` would compute one
scale per call from the input's min/max), so they pass through unchanged and each output row
depends on its own input row only, bit for bit (tests/test_quantization.py). 7-bit digits keep
AVX2's u8*s8 pair sums (vpmaddubsw) below int16 saturation: 127 * 127 * 2 < 32767. The wrapper
around the kernel is a handful of in-place ops: at one token it cost 70-130 us per call beside a
24-355 us kernel (microbenchmark of the default pair's shapes, weights in cache), 10-30 % less now.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from engine import quant_q4
from engine.int4_grids import INT4_GROUP_SIZE, MIN_FRACTION_ON_GRID, may_lie_on_4bit_grids, quantize_int4
from engine.hardware import INT8_KERNELS, default_int8_kernel

QUANTIZATIONS = ("none", "int8", "int8-fast", "int4", "int4-mixed", "nf4")
KERNELS_VERSION = 14                # part of the cached forward-cost key: bump when the layers change
_INT4_INNER_K_TILES = 2
_DIGIT_MAX = 63                     # 7-bit signed digit
_DIGIT_BASE = 2 * _DIGIT_MAX        # second digit resolution: 1/126 of the first's step
FUSABLE_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))   # Llama / Qwen / Mistral names


class FbgemmRowsMatmul:
    """fbgemm's u8 x s8 matmul (AVX2 / AVX512-VNNI) of integer rows by `weight` [N, K] in int8 per channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch marks quantized tensor creation deprecated
            qweight = torch.quantize_per_channel(weight, scales.double(),
                                                 torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        # the overload itself: the packet's per-call Python checks cost ~1 % of a CPU forward
        self.matmul = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.matmul(rows, 1.0, _DIGIT_MAX + 1, self.packed)


class OnednnRowsMatmul:
    """oneDNN's u8 x s8 matmul (AMX int8 tiles where present) of integer rows by `weight` in int8 per channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        qweight = torch.clamp(torch.round(weight / scales[:, None]), -127, 127).to(torch.int8)   # [N, K]
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.scales, self.zero_points = scales, torch.zeros(len(scales), dtype=torch.long)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: integers in [-64, 63] as fp32, shifted in place to u8 (the caller's scratch tensor)."""
        return torch.ops.onednn.qlinear_pointwise(rows.add_(_DIGIT_MAX + 1).to(torch.uint8), 1.0, _DIGIT_MAX + 1,
                                                  self.packed, self.scales, self.zero_points, None, 1.0, 0,
                                                  torch.float32, "none", [], "")


ROWS_MATMULS = {"fbgemm": FbgemmRowsMatmul, "onednn": OnednnRowsMatmul}


class Int8DynamicLinear(nn.Module):
    """W8A8 with per-token activation scales (`num_digits` 7-bit digits per activation).

    kernel: "fbgemm" or "onednn" (AMX int8 tiles: one pass over up to ~16 rows costs what one row
    does); None = the CPU's choice (engine.hardware.default_int8_kernel). Both get the same integer
    rows (scale 1, zero point 64) and sum them exactly in int32.
    """

    def __init__(self, linear: nn.Linear, num_digits: int, kernel: str | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.num_digits = num_digits
        self.kernel = kernel or default_int8_kernel()
        if self.kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel must be one of {INT8_KERNELS}, got {self.kernel!r}")
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0                 # [N]
        self.integer_rows_matmul = ROWS_MATMULS[self.kernel](weight, scales)      # rows [M, K] -> [M, N] fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Few tensor ops per call: on a slow core each costs ~5-7 us, and a forward has ~110 of these layers."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        x = x if x.dtype == torch.float32 else x.float()                           # [M, K]
        num_rows = x.shape[0]
        scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(_DIGIT_MAX)  # [M, 1]
        scaled = x / scale
        if self.num_digits == 1:
            y = self.integer_rows_matmul(scaled.round_())                          # W a  [M, N]
        else:
            a = scaled.round()
            b = scaled.sub_(a).mul_(_DIGIT_BASE).round_()
            out = self.integer_rows_matmul(torch.cat((a, b)))                     # [W a; W b]  [2M, N]
            y = torch.add(out[:num_rows], out[num_rows:], alpha=1 / _DIGIT_BASE)   # W a + W b / 126
        y.mul_(scale)
        if self.bias is not None:
            y.add_(self.bias)
        return (y if dtype == torch.float32 else y.to(dtype)).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation_digits={self.num_digits}, kernel={self.kernel}"


class PackedWeightOnlyLinear(nn.Module):
    """int4 (groups of 32) or int8 (per channel) weights; bf16 activations into aten's packed kernels.

    bf16 inputs take the kernels' vectorised paths (fp32 inputs take a scalar one); the output is
    cast back to the input's dtype.
    """

    def __init__(self, linear: nn.Linear, scheme: str, int4_groups: tuple | None = None):
        """int4_groups: quantize_int4(linear.weight), for scheme int4."""
        super().__init__()
        weight = linear.weight.detach().float()
        self.scheme = scheme
        self.out_features, self.in_features = weight.shape
        self.is_cuda = weight.is_cuda
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if scheme == "int8":
            scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            self.register_buffer("qweight", torch.clamp(torch.round(weight / scales[:, None]), -127, 127).to(torch.int8))
            self.register_buffer("scales", scales.to(torch.bfloat16))
            return
        q, steps, minimums, _ = int4_groups
        # the kernels' convention w ~ (q - 8) * s + z: z = minimum + 8 s      [K/32, N, 2]
        scales_and_zeros = torch.stack([steps, minimums + 8.0 * steps], dim=2).transpose(0, 1).contiguous()
        if self.is_cuda:
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), _INT4_INNER_K_TILES)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales_and_zeros.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.scheme == "int8":
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        elif self.is_cuda:
            y = torch._weight_int4pack_mm(x2, self.qweight, INT4_GROUP_SIZE, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, INT4_GROUP_SIZE, self.scales)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}"


def make_quantized(linear: nn.Linear, scheme: str, int8_kernel: str | None = None,
                   is_draft: bool = False, is_output_layer: bool = False) -> nn.Module | None:
    """The quantized replacement of `linear`, or None where the kernels cannot take its shape.

    int8_kernel: Int8DynamicLinear's kernel (None = the CPU's choice). is_draft: a draft's `nf4`
    layers get an `int8-fast` twin for wide calls where that kernel is oneDNN's AMX one."""
    out_features, in_features = linear.weight.shape
    if scheme == "nf4":
        from engine.quant_nf4 import Nf4Linear, Nf4WithWideTwin, can_take
        if not can_take(linear):
            return make_quantized(linear, "int8", int8_kernel)
        if is_draft and (int8_kernel or default_int8_kernel()) == "onednn":
            return Nf4WithWideTwin(Nf4Linear(linear), make_quantized(linear, "int8-fast", int8_kernel))
        return Nf4Linear(linear)
    if scheme in ("int4", "int4-mixed"):
        return _int4_or_finer(linear, scheme, int8_kernel, is_output_layer=is_output_layer)
    if linear.weight.is_cuda:
        return PackedWeightOnlyLinear(linear, "int8")
    return Int8DynamicLinear(linear, num_digits=2 if scheme == "int8" else 1, kernel=int8_kernel)


def _on_avx2_kernel(linear: nn.Linear) -> bool:
    """Whether this weight's int4 / 8-bit-group layer is the project's AVX2 kernel (a CPU weight, the kernel built)."""
    return not linear.weight.is_cuda and quant_q4.available()


def _int4_refusal(linear: nn.Linear) -> str | None:
    """Why the int4 kernel this weight would run on cannot take its shape (None if it can)."""
    out_features, in_features = linear.weight.shape
    if _on_avx2_kernel(linear):
        return quant_q4.can_take(out_features, in_features)
    multiple = 8 if linear.weight.is_cuda else 16
    if in_features % (2 * INT4_GROUP_SIZE) or out_features % multiple:
        return f"aten's int4 kernels take K % 64 == 0 and N % {multiple} == 0, got K={in_features}, N={out_features}"
    return None


def _finer_than_4bit(linear: nn.Linear, int8_kernel: str | None, is_output_layer: bool = False) -> nn.Module:
    """int4-mixed's layer for weights on no 4-bit grid (a GGUF's Q6_K tensors): 256 levels per group of 32
    on the AVX2 kernel (finer than int8 per channel, and ~5x fbgemm's speed on the small v at one
    token); int8 for the output layer, which fbgemm streams faster (14.5 vs 16.0 ms at one token on
    Zen 1), and where the kernel cannot run."""
    if not is_output_layer and _on_avx2_kernel(linear) and _int4_refusal(linear) is None:
        return quant_q4.GroupedLinear(linear, quant_q4.quantize_uint8_groups(linear.weight.detach()), num_bits=8)
    return make_quantized(linear, "int8", int8_kernel)


def _int4_or_finer(linear: nn.Linear, scheme: str, int8_kernel: str | None, int4_groups: tuple | None = None,
                   is_output_layer: bool = False) -> nn.Module | None:
    """The int4 layer where a kernel takes the shape (and, under int4-mixed, where the weights lie on
    4-bit grids); otherwise _finer_than_4bit under int4-mixed and None under int4. int4_groups:
    quantize_int4's answer for this weight if the caller has it."""
    def fallback() -> nn.Module | None:
        return None if scheme == "int4" else _finer_than_4bit(linear, int8_kernel, is_output_layer)
    if _int4_refusal(linear) or (scheme == "int4-mixed" and int4_groups is None
                                 and not may_lie_on_4bit_grids(linear.weight)):
        return fallback()
    int4_groups = int4_groups or quantize_int4(linear.weight.detach())
    if scheme == "int4-mixed" and int4_groups[3] < MIN_FRACTION_ON_GRID:
        return fallback()                      # not 4-bit weights (a Q6_K tensor): keep them finer
    if _on_avx2_kernel(linear):
        return quant_q4.GroupedLinear(linear, int4_groups)
    return PackedWeightOnlyLinear(linear, "int4", int4_groups)


class SharedInputGroup:
    """Linears that always read the same input (q/k/v, gate/up) run as one kernel call.

    The first member called computes the fused output for that input tensor; the others slice it.
    Keyed on the input tensor object itself, so a new forward (a new tensor) always recomputes.
    """

    def __init__(self, fused: nn.Module):
        self.fused = fused
        self._last_input: torch.Tensor | None = None
        self._last_output: torch.Tensor | None = None

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._last_input:
            self._last_output = self.fused(x)
            self._last_input = x
        return self._last_output


class SliceOfGroup(nn.Module):
    """One member of a SharedInputGroup: columns [start, stop) of the fused output."""

    def __init__(self, group: SharedInputGroup, start: int, stop: int):
        super().__init__()
        self.group_fused = group.fused           # registered once per member: shared parameters
        self._group, self.start, self.stop = group, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output_for(x)[..., self.start:self.stop]


def _int4_siblings(members: list[nn.Linear], combined: nn.Linear, scheme: str,
                   int8_kernel: str | None) -> nn.Module | list[nn.Module | None] | None:
    """int4 / int4-mixed for siblings: one fused layer where all of them (or, under int4-mixed, none
    of them) lie on 4-bit grids; else each member's own layer, from the grids already found (so q
    and k stay 4-bit beside an 8-bit v, and nothing is quantized twice)."""
    if scheme == "int4-mixed" and not any(may_lie_on_4bit_grids(member.weight) for member in members):
        return _finer_than_4bit(combined, int8_kernel)
    groups = [quantize_int4(member.weight.detach()) for member in members]
    on_grid = [fraction >= MIN_FRACTION_ON_GRID for *_, fraction in groups]
    if scheme == "int4-mixed" and not any(on_grid):
        return _finer_than_4bit(combined, int8_kernel)
    if scheme == "int4" or all(on_grid):
        fused_groups = (*(torch.cat([g[i] for g in groups]) for i in range(3)), min(g[3] for g in groups))
        fused = _int4_or_finer(combined, scheme, int8_kernel, fused_groups)
        if fused is not None:
            return fused
    return [_int4_or_finer(member, scheme, int8_kernel, g) for member, g in zip(members, groups)]


def _fuse_shared_inputs(model: nn.Module, scheme: str, int8_kernel: str | None, is_draft: bool) -> int:
    """Replace each q/k/v and gate/up set of nn.Linear siblings by slices of one quantized linear."""
    num_replaced = 0
    for parent in list(model.modules()):
        for names in FUSABLE_SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, nn.Linear) for m in members):
                continue
            if len({m.in_features for m in members}) != 1 or any(m.weight.is_cuda for m in members):
                continue
            has_bias = [m.bias is not None for m in members]
            combined = nn.Linear(members[0].in_features, sum(m.out_features for m in members), bias=any(has_bias))
            with torch.no_grad():
                combined.weight.copy_(torch.cat([m.weight.float() for m in members]))
                if any(has_bias):
                    combined.bias.copy_(torch.cat([m.bias.float() if m.bias is not None else
                                                   torch.zeros(m.out_features) for m in members]))
            if scheme.startswith("int4"):
                fused = _int4_siblings(members, combined, scheme, int8_kernel)
            else:
                fused = make_quantized(combined, scheme, int8_kernel, is_draft)
            if isinstance(fused, list):                 # each member its own layer
                for name, layer in zip(names, fused):
                    if layer is not None:
                        setattr(parent, name, layer)
                        num_replaced += 1
                continue
            if fused is None:
                continue
            group, start = SharedInputGroup(fused), 0
            for name, member in zip(names, members):
                setattr(parent, name, SliceOfGroup(group, start, start + member.out_features))
                start += member.out_features
            num_replaced += len(members)
    return num_replaced


def quantize_model(model: nn.Module, scheme: str, int8_kernel: str | None = None, is_draft: bool = False) -> int:
    """Replace every nn.Linear the kernels support (lm_head too) in place; return how many.

    CPU int8 schemes, nf4 and the AVX2 int4 kernel fuse q/k/v and gate/up into one call each (one
    activation quantization, one kernel launch, a wider matmul); each output row still depends on
    its own input row only.
    """
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {scheme!r}")
    if scheme == "none":
        return 0
    fusable = scheme in ("int8", "int8-fast", "nf4") or (scheme.startswith("int4") and quant_q4.available())
    num_replaced = _fuse_shared_inputs(model, scheme, int8_kernel, is_draft) if fusable else 0
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        replacement = make_quantized(module, scheme, int8_kernel, is_draft, is_output_layer=module is output_layer)
        if replacement is None:
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, replacement)
        num_replaced += 1
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False     # lm_head is now its own (quantized) module
    return num_replaced
