"""engine/quantization.py: the packed kernels are row-independent (bit for bit) and accurate.

Row independence is what keeps a k-token verify equal to k one-token forwards, hence ar / sync /
async token-identical on a quantized verify model (checked end to end in test_speed_features.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.hardware import INT8_KERNELS
from engine import quant_q4
from engine.quant_q4 import GroupedLinear
from engine.int4_grids import INT4_GROUP_SIZE, quantize_int4
from engine.quantization import Int8DynamicLinear, PackedWeightOnlyLinear, make_quantized, quantize_model

SCHEMES = ["int8", "int8-fast", "int4", "int4-mixed"]
SCHEME_KERNELS = [(scheme, kernel) for scheme in SCHEMES for kernel in INT8_KERNELS
                  if kernel == INT8_KERNELS[0] or scheme.startswith("int8")]   # int4 has no int8 kernel to pick


def _linear(in_features: int = 256, out_features: int = 96, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    return linear


@pytest.mark.parametrize("scheme, kernel", SCHEME_KERNELS)
def test_each_output_row_depends_on_its_own_input_row_only(scheme, kernel):
    layer = make_quantized(_linear(), scheme, kernel)
    torch.manual_seed(1)
    x = torch.randn(9, 256) * torch.logspace(-2, 1, 9)[:, None]    # rows of very different magnitudes
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(9)])
        for num_rows in range(1, 9):
            assert torch.equal(layer(x[:num_rows]), together[:num_rows]), f"{scheme}: rows depend on {num_rows}-row batch"
    assert torch.equal(together, alone), f"{scheme}: a row's output changed with the other rows in the call"


@pytest.mark.parametrize("scheme, max_relative_error", [("int8", 0.012), ("int8-fast", 0.04), ("int4", 0.15)])
def test_accuracy_against_fp32(scheme, max_relative_error):
    linear = _linear(bias=False)
    layer = make_quantized(linear, scheme)
    x = torch.randn(16, 256)
    with torch.inference_mode():
        reference = linear(x)
        error = (layer(x) - reference).norm() / reference.norm()
    assert error < max_relative_error, f"{scheme}: relative error {error:.4f}"


def test_two_digits_are_more_accurate_than_one():
    linear = _linear(bias=False)
    x = torch.randn(16, 256)
    with torch.inference_mode():
        reference = linear(x)
        errors = {digits: float((Int8DynamicLinear(linear, digits)(x) - reference).norm()) for digits in (1, 2)}
    assert errors[2] < errors[1] / 2


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("num_digits", [1, 2])
def test_int8_layer_computes_its_documented_digits_exactly(num_digits, kernel):
    """y[m] = s[m] * (W a[m] + W b[m] / 126) * w_scale, from the integer weights: the digits reach
    the kernel unchanged (scale 1, zero point 64), whatever the other rows hold, on either kernel."""
    linear = _linear()
    layer = Int8DynamicLinear(linear, num_digits, kernel)
    w_scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127                 # [N, 1]
    weight = torch.round(linear.weight.detach() / w_scale).double() * w_scale.double()     # [N, K]
    x = torch.randn(5, 256) * torch.logspace(-2, 1, 5)[:, None]
    scale = x.abs().amax(dim=1, keepdim=True) / 63                       # the digits in fp32, as the layer
    a = torch.round(x / scale)
    y = a.double() @ weight.T                                            # the sums exactly, in float64
    if num_digits == 2:
        y = y + torch.round((x / scale - a) * 126).double() @ weight.T / 126
    reference = y * scale.double() + layer.bias.double()
    with torch.inference_mode():
        out = layer(x).double()
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6), (out - reference).abs().max()


def _on_4bit_grids(out_features: int = 64, in_features: int = 256) -> nn.Linear:
    """Weights as a dequantized Q4_K tensor holds them: per group of 32, min + q * step, q in
    [0, 15]; some groups use fewer than 16 levels (their grid is not their min/max's)."""
    generator = torch.Generator().manual_seed(3)
    num_groups = out_features * in_features // INT4_GROUP_SIZE
    steps = torch.rand(num_groups, 1, generator=generator) * 0.01 + 0.001
    minimums = -8 * steps + torch.randn(num_groups, 1, generator=generator) * 0.002
    top = torch.randint(6, 16, (num_groups, 1), generator=generator)            # highest level used
    q = (torch.rand(num_groups, INT4_GROUP_SIZE, generator=generator) * (top + 1)).floor().clamp(max=top)
    q[:, 0], q[:, 1] = 0, top[:, 0]
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_((minimums + q * steps).reshape(out_features, in_features))
    return linear


def test_int4_reencodes_weights_already_on_4bit_grids_exactly():
    linear = _on_4bit_grids()
    q, steps, minimums, fraction_on_grid = quantize_int4(linear.weight)
    assert fraction_on_grid == 1.0
    groups = q.reshape(64, -1, INT4_GROUP_SIZE).float()                          # [N, G, 32]
    dequantized = (groups * steps[..., None] + minimums[..., None]).reshape(64, 256)
    assert torch.allclose(dequantized, linear.weight, atol=1e-6)
    *_, fraction_random = quantize_int4(_linear(bias=False).weight)           # normal weights: off any grid
    assert fraction_random < 0.1


def test_int4_mixed_keeps_4bit_layers_int4_and_the_others_int8():
    assert isinstance(make_quantized(_on_4bit_grids(), "int4-mixed"), (GroupedLinear, PackedWeightOnlyLinear))
    off_grid = make_quantized(_linear(), "int4-mixed")           # 256 levels per group on the AVX2 kernel, else int8
    assert (off_grid.num_bits == 8) if isinstance(off_grid, GroupedLinear) else isinstance(off_grid, Int8DynamicLinear)
    assert isinstance(make_quantized(nn.Linear(100, 64), "int4-mixed"), Int8DynamicLinear)   # shape int4 cannot take
    linear = _on_4bit_grids()
    x = torch.randn(4, 256)
    with torch.inference_mode():
        reference = linear(x)
        errors = {scheme: float((make_quantized(linear, scheme)(x) - reference).norm() / reference.norm())
                  for scheme in ("int4-mixed", "int8")}
    # the weights are re-encoded exactly (tests/test_quant_q4.py); what is left is the activations'
    # rounding (int8 per group of 32 on the AVX2 kernel, bf16 on aten's), about int8's own error
    assert errors["int4-mixed"] < 0.01 and errors["int4-mixed"] < 1.25 * errors["int8"], errors


def test_int4_skips_shapes_the_kernel_cannot_take():
    assert make_quantized(nn.Linear(100, 64), "int4") is None         # K not a multiple of 64
    assert isinstance(make_quantized(nn.Linear(128, 64), "int4"), (GroupedLinear, PackedWeightOnlyLinear))


def test_bias_and_output_dtype_are_kept():
    linear = _linear()
    layer = make_quantized(linear, "int8")
    x = torch.zeros(2, 256, dtype=torch.float64)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == torch.float64
    assert torch.allclose(y, linear.bias.double().expand(2, -1), atol=1e-6)   # zero input -> the bias


def test_quantize_model_replaces_every_linear_and_unties_the_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.tiny_models import ensure_tiny_model
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny-random/verify", str(tmp_path)))
    num_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize_model(model, "int8") == num_linear
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.config.tie_word_embeddings is False
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_int4_mixed_keeps_the_output_layer_int8(tmp_path):
    """Off-grid layers take 256 levels per group on the AVX2 kernel, except the output layer, which
    fbgemm's int8 streams faster (engine/quantization.py: _finer_than_4bit)."""
    from transformers import AutoModelForCausalLM

    from engine.tiny_models import ensure_tiny_model
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("tiny-random/verify", str(tmp_path)))
    quantize_model(model, "int4-mixed")                      # random weights: no layer on a 4-bit grid
    assert isinstance(model.lm_head, Int8DynamicLinear)
    if quant_q4.available():
        eight_bit = [m for m in model.modules() if isinstance(m, GroupedLinear)]
        assert eight_bit and all(m.num_bits == 8 for m in eight_bit)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")


def test_quant_quality_compares_each_scheme_with_the_first(tmp_path):
    from engine.quant_quality import compare_schemes
    from engine.tiny_models import ensure_tiny_model
    path = ensure_tiny_model("tiny-random/verify", str(tmp_path))
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    none, again, fast = compare_schemes(path, ["none", "none", "int8-fast"], ids)
    assert none["argmax_agreement"] == again["argmax_agreement"] == 1.0 and again["mean_kl"] == 0.0
    assert fast["mean_kl"] > 0.0 and 0.5 < fast["argmax_agreement"] <= 1.0


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "fbgemm"), ({"avx512f", "avx512_vnni"}, "fbgemm"),
                                             ({"avx512_vnni", "amx_bf16", "amx_int8"}, "onednn")])
def test_int8_layers_take_onednn_where_the_cpu_has_amx_int8(monkeypatch, flags, expected):
    from engine import hardware
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.default_int8_kernel() == expected
    assert Int8DynamicLinear(_linear(), 1).kernel == expected
    with pytest.raises(ValueError, match="int8 kernel"):
        Int8DynamicLinear(_linear(), 1, "mkl")


@pytest.mark.parametrize("scheme", ["int8", "int8-fast"])
def test_both_int8_kernels_give_one_model_the_same_outputs(scheme):
    """The kernels sum the same integer rows exactly; only the fp32 epilogue may round differently."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    model.config = None
    x = torch.randn(7, 128)
    outputs = []
    for kernel in INT8_KERNELS:
        quantized = copy.deepcopy(model)
        quantize_model(quantized, scheme, int8_kernel=kernel)
        assert all(m.kernel == kernel for m in quantized if isinstance(m, Int8DynamicLinear))
        with torch.inference_mode():
            outputs.append(quantized(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_matmul_cost_times_one_layer_under_every_kernel(monkeypatch):
    """engine/matmul_cost.py compares like with like: every kernel computes the same layer."""
    from engine import matmul_cost
    linear = nn.Linear(256, 96, bias=False)
    x = torch.randn(3, 256)
    with torch.inference_mode():
        reference = linear(x)
        for name, kernel in matmul_cost.layer_kernels(linear).items():
            error = (kernel(x).float() - reference).abs().max() / reference.abs().max()
            tolerance = 0.1 if name.startswith("int4") else {"int8-fast": 0.05}.get(name, 0.01)  # int4: 16 levels
            assert error < tolerance, (name, error)
    monkeypatch.setattr(matmul_cost, "NUM_CALLS", 2)
    costs = matmul_cost.layer_costs(64, 32)
    is_vnni = quant_q4.build_name() not in (None, "avx2")           # then the AVX2 build is timed beside it
    expected = {"int8", "int8-fast", "int8-onednn", "int8-wo", "int4", "fp32"} | ({"int4-avx2"} if is_vnni else set())
    assert set(costs) == expected
    assert all(set(by_rows) == set(matmul_cost.ROWS) and min(by_rows.values()) > 0 for by_rows in costs.values())
