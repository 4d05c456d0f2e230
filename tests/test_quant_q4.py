"""engine/quant_q4.py + engine/kernels/q4_matmul.c: the AVX2 4-bit layer computes its documented
arithmetic, row-independent bit for bit, and taken by `int4` / `int4-mixed` on CPU where it builds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import hardware, quant_q4, quantization
from engine.quant_q4 import GroupedLinear, pack_int4, unpack_int4
from engine.int4_grids import quantize_int4
from engine.quantization import Int8DynamicLinear, PackedWeightOnlyLinear, SliceOfGroup, make_quantized, quantize_model

needs_kernel = pytest.mark.skipif(not quant_q4.available(), reason=f"q4 kernel: {quant_q4.unavailable_reason()}")


def _on_4bit_grids(in_features: int = 256, out_features: int = 40, bias: bool = True, seed: int = 0) -> nn.Linear:
    """A linear whose weights lie on per-group affine 4-bit grids (like a dequantized Q4_K GGUF)."""
    generator = torch.Generator().manual_seed(seed)
    num_groups = out_features * in_features // 32
    steps = torch.rand(num_groups, 1, generator=generator) * 0.01 + 0.001
    minimums = -8 * steps + torch.randn(num_groups, 1, generator=generator) * 0.002
    q = torch.randint(0, 16, (num_groups, 32), generator=generator).float()
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_((minimums + q * steps).reshape(out_features, in_features))
        if bias:
            linear.bias.normal_(0, 0.1, generator=generator)
    return linear


def test_packing_round_trips_and_puts_8_outputs_side_by_side():
    q = torch.randint(0, 16, (16, 64))
    packed = pack_int4(q)
    assert packed.shape == (2, 256) and packed.dtype == torch.uint8                # [N / 8, 4 K]
    assert torch.equal(unpack_int4(packed).long(), q)
    group = packed[1, 128:256].long().reshape(4, 8, 4)                           # block 1 (outputs 8..15), group 1
    for t in range(4):
        for o in range(8):
            assert torch.equal(group[t, o] & 15, q[8 + o, 32 + 8 * t:32 + 8 * t + 4])
            assert torch.equal(group[t, o] >> 4, q[8 + o, 32 + 8 * t + 4:32 + 8 * t + 8])


def _weight_parts(layer: GroupedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps * (q - C), mins + C steps) [N, K] float64: the centred levels and the centres (C = 8 for
    4 bits, 128 for 8)."""
    def per_weight(per_block: torch.Tensor) -> torch.Tensor:
        per_group = per_block.double().transpose(1, 2).reshape(layer.num_kernel_outputs, -1)[:layer.out_features]
        return per_group.repeat_interleave(32, dim=1)
    centres = per_weight(layer.mins) + (8 if layer.num_bits == 4 else 128) * per_weight(layer.steps)
    return layer.dequantized_weight().double() - centres, centres


def _documented_arithmetic(layer: GroupedLinear, x: torch.Tensor) -> torch.Tensor:
    """The kernel's sums in float64: the centred levels times each group of 32 activations as int8 on
    its own scale, plus the centres times the exact activations."""
    groups = x.double().reshape(x.shape[0], -1, 32)                               # [M, G, 32]
    scales = groups.abs().amax(dim=2, keepdim=True) / 127
    a = torch.where(scales > 0, groups / scales, torch.zeros_like(groups)).round().clamp(-127, 127)
    centred, centres = _weight_parts(layer)
    return (a * scales).reshape(x.shape) @ centred.T + x.double() @ centres.T + layer.bias.double()[:layer.out_features]


@needs_kernel
def test_output_is_the_dequantized_weights_times_the_input():
    linear = _on_4bit_grids()
    layer = make_quantized(linear, "int4")
    assert isinstance(layer, GroupedLinear)
    q, steps, minimums, _ = quantize_int4(linear.weight.detach())
    fp16_rounding = (q.reshape(40, 8, 32) * steps[..., None] + minimums.abs()[..., None]).reshape(40, 256) * 2 ** -11
    assert ((layer.dequantized_weight() - linear.weight).abs() <= fp16_rounding + 1e-9).all()   # on-grid weights
    x = torch.randn(5, 256) * torch.logspace(-3, 2, 256)                         # channels of very different sizes
    x[0, :32] = 0                                                                 # a group of zeros (scale 0)
    with torch.inference_mode():
        y = layer(x).double()
    assert torch.allclose(y, _documented_arithmetic(layer, x), rtol=1e-5, atol=1e-5)
    # and so within the activations' rounding of the exact product: |steps (q - 8)| . |x - s a| <= ... s / 2
    exact = x.double() @ layer.dequantized_weight().double().T + linear.bias.double()
    half_steps = (x.double().reshape(5, 8, 32).abs().amax(dim=2) / 127 / 2).repeat_interleave(32, dim=1)
    assert ((y - exact).abs() <= half_steps @ _weight_parts(layer)[0].abs().T + 1e-5).all()


@needs_kernel
@pytest.mark.parametrize("in_features", [32, 320, 512])           # G = 1, 10, 16 groups
def test_each_output_row_depends_on_its_own_input_row_only(in_features):
    layer = make_quantized(_on_4bit_grids(in_features, 24), "int4")
    x = torch.randn(11, in_features) * torch.logspace(-2, 1, 11)[:, None]
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(11)])
        for num_rows in range(1, 11):               # chunks of 4 rows and every remainder
            assert torch.equal(layer(x[:num_rows]), together[:num_rows])
        assert torch.equal(layer(x[5:]), together[5:])
    assert torch.equal(together, alone)


@needs_kernel
@pytest.mark.parametrize("num_bits", [4, 8])
def test_the_norm_prologue_quantizes_the_rms_norm_of_each_row(num_bits):
    """layer(x, w, eps) is layer(RMSNorm(x)) (the norm computed in C, a different rounding: close, not
    equal), and each row is still its own input's only, bit for bit."""
    linear = _on_4bit_grids(320, 24)
    groups = quantize_int4(linear.weight.detach()) if num_bits == 4 else quant_q4.quantize_uint8_groups(linear.weight.detach())
    layer = GroupedLinear(linear, groups, num_bits)
    x = torch.randn(7, 320) * torch.logspace(-3, 2, 7)[:, None]          # the norm takes each row's scale off
    weight, eps = torch.rand(320) + 0.5, 1e-6
    with torch.inference_mode():
        fused = layer(x, weight, eps)
        normed = weight * (x * x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt())
        unfused = layer(normed)
        assert torch.allclose(fused, unfused, rtol=1e-3, atol=1e-3 * unfused.abs().max().item())
        assert not torch.allclose(fused, layer(x), atol=1e-2), "the norm must change the input"
        assert torch.equal(torch.cat([layer(x[i:i + 1], weight, eps) for i in range(7)]), fused)
        with pytest.raises(ValueError, match="norm_weight must be"):
            layer(x, weight[:32], eps)


@needs_kernel
@pytest.mark.parametrize("num_bits", [4, 8])
def test_the_gated_prologue_quantizes_silu_of_the_gate_times_up(num_bits):
    """layer(gate_up, is_gated=True) is layer(silu(gate) * up) (exp in C: close, not equal), over
    gates from -100 to 100 (exp's clamps), and rows stay independent."""
    linear = _on_4bit_grids(320, 24)
    groups = quantize_int4(linear.weight.detach()) if num_bits == 4 else quant_q4.quantize_uint8_groups(linear.weight.detach())
    layer = GroupedLinear(linear, groups, num_bits)
    gate_up = torch.randn(6, 640) * 4
    gate_up[0, :320] = torch.linspace(-100, 100, 320)
    with torch.inference_mode():
        fused = layer(gate_up, is_gated=True)
        unfused = layer(nn.functional.silu(gate_up[:, :320]) * gate_up[:, 320:])
        assert torch.allclose(fused, unfused, rtol=1e-4, atol=1e-4 * unfused.abs().max().item())
        assert torch.equal(torch.cat([layer(gate_up[i:i + 1], is_gated=True) for i in range(6)]), fused)
        with pytest.raises(ValueError, match="no norm"):
            layer(gate_up, torch.ones(320), 1e-6, is_gated=True)


@needs_kernel
def test_threads_do_not_change_the_bits():
    layer = make_quantized(_on_4bit_grids(256, 104), "int4")
    x = torch.randn(6, 256)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_int4_mixed_fuses_only_4bit_siblings_and_gives_the_others_8_bits(monkeypatch):
    num_quantized = []
    monkeypatch.setattr(quantization, "quantize_int4", lambda w: num_quantized.append(1) or quantize_int4(w))
    attention = nn.Module()
    attention.q_proj, attention.k_proj = _on_4bit_grids(256, 64, seed=1), _on_4bit_grids(256, 32, seed=2)
    attention.v_proj = nn.Linear(256, 32)                                        # off any grid (a Q6_K tensor)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = _on_4bit_grids(256, 96, False, seed=3), _on_4bit_grids(256, 96, False, seed=4)
    model = nn.Module()
    model.attention, model.mlp, model.config = attention, mlp, type("Config", (), {})()
    x = torch.randn(3, 256)
    with torch.inference_mode():
        reference = {name: getattr(parent, name)(x) for parent, names in ((attention, ("q_proj", "k_proj", "v_proj")),
                                                                         (mlp, ("gate_proj", "up_proj"))) for name in names}
        assert quantize_model(model, "int4-mixed") == 5
        assert isinstance(mlp.gate_proj, SliceOfGroup) and isinstance(mlp.gate_proj.group_fused, GroupedLinear)
        assert isinstance(attention.q_proj, GroupedLinear) and isinstance(attention.k_proj, GroupedLinear)
        assert isinstance(attention.v_proj, GroupedLinear) and attention.v_proj.num_bits == 8
        assert attention.q_proj.num_bits == attention.k_proj.num_bits == mlp.gate_proj.group_fused.num_bits == 4
        assert len(num_quantized) == 5                                           # each member's grids found once
        for parent, name in ((attention, "q_proj"), (attention, "v_proj"), (mlp, "gate_proj"), (mlp, "up_proj")):
            got, expected = getattr(parent, name)(x), reference[name]
            assert float((got - expected).norm() / expected.norm()) < 0.01, name


@needs_kernel
def test_a_shape_the_kernel_cannot_take_is_refused_with_a_reason():
    linear = nn.Linear(80, 8)                                                     # K not whole groups of 32
    with pytest.raises(ValueError, match="whole groups of 32"):
        GroupedLinear(linear, (torch.zeros(8, 80, dtype=torch.int32), None, None))
    assert make_quantized(linear, "int4") is None
    assert isinstance(make_quantized(linear, "int4-mixed"), Int8DynamicLinear)


@needs_kernel
def test_outputs_past_whole_blocks_of_8_are_padded_and_sliced_off():
    linear = _on_4bit_grids(64, 21)
    layer = make_quantized(linear, "int4")
    assert isinstance(layer, GroupedLinear) and layer.num_kernel_outputs == 24
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (3, 21) and y.is_contiguous()
    assert torch.allclose(y.double(), _documented_arithmetic(layer, x), rtol=1e-5, atol=1e-5)


def test_int4_takes_atens_kernel_where_this_one_cannot_run(monkeypatch):
    monkeypatch.setattr(quant_q4, "available", lambda: False)
    assert isinstance(make_quantized(_on_4bit_grids(256, 64), "int4"), PackedWeightOnlyLinear)


def test_a_failed_build_says_why_and_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("AMUSD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")                   # a "compiler" that always fails
    monkeypatch.setattr(quant_q4, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    quant_q4._load.cache_clear()
    try:
        assert not quant_q4.available() and "failed" in quant_q4.unavailable_reason()
        assert not list(tmp_path.glob("*.so"))
        monkeypatch.setattr(quant_q4, "cpu_flags", lambda: frozenset({"avx", "sse4_2"}))
        quant_q4._load.cache_clear()
        assert "avx2" in quant_q4.unavailable_reason()
    finally:
        quant_q4._load.cache_clear()


def test_int4_quantization_recovers_the_grid():
    linear = _on_4bit_grids(bias=False)
    q, steps, minimums, fraction_on_grid = quantize_int4(linear.weight)
    assert fraction_on_grid == 1.0 and steps.shape == minimums.shape == (40, 8)


def _other_builds() -> list[str]:
    return [name for name in quant_q4.runnable_builds() if name != "avx2"]


@needs_kernel
@pytest.mark.skipif(not _other_builds(), reason="this CPU runs only the AVX2 build (no VNNI)")
@pytest.mark.parametrize("num_bits", [4, 8])
def test_every_build_gives_the_avx2_builds_bits(num_bits):
    """vpdpbusd (and AMX's tdpbssd, from 4 / 8 rows) sums the same integers as vpmaddubsw + vpmaddwd:
    every build's outputs are equal, at row counts on either side of the AMX path's thresholds and
    past its 16-row tiles."""
    linear = _on_4bit_grids(256, 40)
    groups = quantize_int4(linear.weight) if num_bits == 4 else quant_q4.quantize_uint8_groups(linear.weight.detach())
    reference = GroupedLinear(linear, groups, num_bits=num_bits, build="avx2")
    x, norm_weight = torch.randn(35, 256) * 3, torch.rand(256) + 0.5
    gate_up = torch.randn(19, 512)
    down = nn.Linear(256, 40)
    down_groups = quant_q4.quantize_uint8_groups(down.weight.detach()) if num_bits == 8 else quantize_int4(down.weight)
    down_reference = GroupedLinear(down, down_groups, num_bits=num_bits, build="avx2")
    for build in _other_builds():
        layer = GroupedLinear(linear, groups, num_bits=num_bits, build=build)
        assert build in repr(layer)
        for m in (1, 3, 4, 7, 8, 16, 17, 35):
            assert torch.equal(layer(x[:m]), reference(x[:m]))
        assert torch.equal(layer(x, norm_weight, 1e-6), reference(x, norm_weight, 1e-6))
        assert torch.equal(GroupedLinear(down, down_groups, num_bits=num_bits, build=build)(gate_up, is_gated=True),
                           down_reference(gate_up, is_gated=True))


def test_builds_follow_the_cpu_flags(monkeypatch):
    base = {"avx2", "fma", "f16c"}
    for flags, builds in ((base, ("avx2",)), (base | {"avx_vnni"}, ("avx-vnni", "avx2")),
                          (base | {"avx512_vnni", "avx512vl", "avx512bw", "avx_vnni"}, ("avx512-vnni", "avx-vnni", "avx2")),
                          (base | {"avx512_vnni", "avx512vl", "avx_vnni"}, ("avx-vnni", "avx2")),
                          (base | {"avx512_vnni", "avx512vl", "avx512bw", "amx_int8", "amx_tile"},
                           ("amx", "avx512-vnni", "avx2")),
                          (base | {"avx512_vnni"}, ("avx2",)), ({"avx2", "fma"}, ())):
        monkeypatch.setattr(quant_q4, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert quant_q4.runnable_builds() == builds


def test_a_compiler_without_vnni_falls_back_to_the_avx2_build(monkeypatch, tmp_path):
    """A VNNI build that fails to compile (an old compiler) is skipped, not fatal."""
    import shutil
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler")
    compiler = tmp_path / "cc-without-vnni"
    compiler.write_text(f'#!/bin/sh\ncase "$*" in *-mavx512vnni*|*-mavxvnni*) echo "unknown option" >&2; exit 1;; esac\nexec {real} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("AMUSD_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setattr(quant_q4, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx_vnni"}))
    quant_q4._load.cache_clear()
    try:
        if "avx2" not in hardware.cpu_flags():
            pytest.skip("this CPU cannot load the AVX2 build")
        assert quant_q4.build_name() == "avx2"
        assert not quant_q4._load("avx-vnni")[0] and "failed" in quant_q4._load("avx-vnni")[1]
        assert [p.name.split("-")[1] for p in (tmp_path / "kernels").glob("*.so")] == ["avx2"]
    finally:
        quant_q4._load.cache_clear()


def test_prebuild_compiles_every_build_whatever_this_cpu_runs(monkeypatch, tmp_path):
    """The Docker image compiles all builds on its build machine, for the CPUs it will run on."""
    import shutil
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    monkeypatch.setenv("AMUSD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(quant_q4, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))   # an AVX2-only host
    assert quant_q4.prebuild() == {"amx": "built", "avx512-vnni": "built", "avx-vnni": "built", "avx2": "built"}
    assert sorted(p.name.split("-")[1] for p in tmp_path.glob("*.so")) == ["amx", "avx", "avx2", "avx512"]
