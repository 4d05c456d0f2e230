"""engine/quantization.py: the packed kernels are row-independent (bit for bit) and accurate.

Row independence is what keeps a k-token verify equal to k one-token forwards, hence ar / sync /
async token-identical on a quantized verify model (checked end to end in test_speed_features.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.quantization import Int8DynamicLinear, PackedWeightOnlyLinear, make_quantized, quantize_model

SCHEMES = ["int8", "int8-fast", "int4"]


def _linear(in_features: int = 256, out_features: int = 96, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    return linear


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_output_row_depends_on_its_own_input_row_only(scheme):
    layer = make_quantized(_linear(), scheme)
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


def test_int4_skips_shapes_the_kernel_cannot_take():
    assert make_quantized(nn.Linear(100, 64), "int4") is None         # K not a multiple of 64
    assert isinstance(make_quantized(nn.Linear(128, 64), "int4"), PackedWeightOnlyLinear)


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


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")
