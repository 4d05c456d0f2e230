"""engine/quant_nf4.py: scheme nf4 (bitsandbytes' CPU kernel) is row-independent, computes the NF4
weights it stores, and is refused with a clear reason where it cannot run.

The kernel tests need an AVX512_BF16 CPU with bitsandbytes installed; elsewhere they are skipped
(the refusal tests run everywhere).
"""
from __future__ import annotations

import pytest
import torch

from engine import hardware
from engine.config import ConfigError, EngineConfig
from tests.engine_helpers import random_prompts, run, start_engine, tiny_config
from tests.test_quantization import _linear

NF4_REASON = hardware.nf4_unavailable_reason("nf4", "cpu")
needs_nf4 = pytest.mark.skipif(NF4_REASON is not None, reason=f"nf4 cannot run here: {NF4_REASON}")


def _dequantized_weight(layer) -> torch.Tensor:
    """The weight an Nf4Linear's kernel multiplies by, [N, K] fp32: the kernel applied to the identity."""
    from engine.quant_nf4 import NF4_BLOCK_SIZE
    eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
    return torch.ops.bitsandbytes.gemv_4bit(eye, layer.packed, [layer.out_features, layer.in_features],
                                            layer.absmax, layer.code, NF4_BLOCK_SIZE).float().t()


@needs_nf4
def test_each_output_row_depends_on_its_own_input_row_only():
    from engine.quantization import make_quantized
    layer = make_quantized(_linear(), "nf4")
    torch.manual_seed(1)
    x = torch.randn(9, 256) * torch.logspace(-2, 1, 9)[:, None]
    with torch.inference_mode():
        together = layer(x)
        for num_rows in range(1, 9):
            assert torch.equal(layer(x[:num_rows]), together[:num_rows])
        assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(9)]))


@needs_nf4
def test_layer_multiplies_by_bitsandbytes_nf4_weights():
    """Reference: bitsandbytes' own quantize/dequantize in its standard layout, then a float matmul."""
    from bitsandbytes import functional

    from engine.quant_nf4 import NF4_BLOCK_SIZE, Nf4Linear
    linear = _linear(bias=True)
    layer = Nf4Linear(linear)
    packed, state = functional.quantize_4bit(linear.weight.detach().to(torch.bfloat16), blocksize=NF4_BLOCK_SIZE,
                                             quant_type="nf4", compress_statistics=False)
    weight = functional.dequantize_4bit(packed, state).float()                       # [N, K]
    stored = _dequantized_weight(layer)          # the kernel's scales are bf16 (bitsandbytes' CPU layout)
    assert ((stored - weight).abs() <= weight.abs() * 2 ** -7 + 1e-6).all()
    x = torch.randn(5, 256)
    with torch.inference_mode():
        expected = x.to(torch.bfloat16).float() @ weight.t() + linear.bias
        got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert ((got - expected).norm() / expected.norm()) < 0.01                       # bf16 output rounding
    with torch.inference_mode():
        error = (got - linear(x)).norm() / linear(x).norm()
    assert 0.01 < error < 0.15, f"4-bit weights: relative error {error:.4f} against fp32"


@needs_nf4
def test_shapes_the_kernel_cannot_take_stay_int8():
    from engine.quant_nf4 import Nf4Linear
    from engine.quantization import Int8DynamicLinear, make_quantized
    assert isinstance(make_quantized(_linear(256, 96), "nf4"), Nf4Linear)
    assert isinstance(make_quantized(_linear(256, 100), "nf4"), Int8DynamicLinear)      # N % 32
    assert isinstance(make_quantized(_linear(96, 64), "nf4"), Int8DynamicLinear)       # K % 64


@needs_nf4
def test_a_draft_on_amx_takes_its_int8_twin_for_wide_calls_only():
    """Draft nf4 layers beside oneDNN: NF4 for up to MAX_NF4_ROWS_BESIDE_AMX rows, int8-fast above,
    each bit for bit; a verify (is_draft False) and a draft beside fbgemm get plain NF4 layers."""
    from engine.quant_nf4 import MAX_NF4_ROWS_BESIDE_AMX, Nf4Linear, Nf4WithWideTwin
    from engine.quantization import Int8DynamicLinear, make_quantized
    linear = _linear(256, 96)
    twin = make_quantized(linear, "nf4", "onednn", is_draft=True)
    assert isinstance(twin, Nf4WithWideTwin)
    assert isinstance(make_quantized(linear, "nf4", "onednn"), Nf4Linear)
    assert isinstance(make_quantized(linear, "nf4", "fbgemm", is_draft=True), Nf4Linear)
    nf4, int8_fast = Nf4Linear(linear), Int8DynamicLinear(linear, 1, "onednn")
    x = torch.randn(1, 2 * MAX_NF4_ROWS_BESIDE_AMX, 256)
    with torch.inference_mode():
        for num_rows in (1, MAX_NF4_ROWS_BESIDE_AMX, MAX_NF4_ROWS_BESIDE_AMX + 1, 2 * MAX_NF4_ROWS_BESIDE_AMX):
            rows = x[:, :num_rows]
            expected = (nf4 if num_rows <= MAX_NF4_ROWS_BESIDE_AMX else int8_fast)(rows)
            assert torch.equal(twin(rows), expected), f"{num_rows} rows took the other kernel"


def test_nf4_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ConfigError, match="draft_quantization nf4: a CPU scheme"):
        EngineConfig(verify_model="v", draft_model="d", draft_quantization="nf4", draft_device="cuda:0")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(ConfigError, match="verify_quantization nf4: needs a CPU with AVX512_BF16.*avx2"):
        EngineConfig(verify_model="v", verify_quantization="nf4")
    assert hardware.nf4_unavailable_reason("int8-fast", "cpu") is None


@needs_nf4
def test_async_with_an_nf4_draft_equals_ar(tmp_path):
    """The draft's scheme changes only what it proposes: the output is the verify's alone."""
    quantized = dict(dtype="float32", verify_quantization="int8")
    ar = start_engine(tiny_config(str(tmp_path), "ar", **quantized))
    spec = start_engine(tiny_config(str(tmp_path), "async", **quantized, draft_quantization="nf4"))
    try:
        assert spec.health()["workers"]["draft"]["quantization"] == "nf4"
        num_accepted = 0
        for prompt in random_prompts(4, seed=5):
            expected, _ = run(ar, prompt, max_tokens=32)
            tokens, final = run(spec, prompt, max_tokens=32)
            assert tokens == expected
            num_accepted += final.stats.num_accepted_tokens
        assert num_accepted > 0, "the nf4 draft must have contributed"
    finally:
        spec.shutdown()
        ar.shutdown()
