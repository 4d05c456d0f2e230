"""engine/decoder.py: the lean decoder gives transformers' logits bit for bit, through prefill chunks,
multi-token forwards, rollbacks and KV growth; unsupported models fall back to transformers'."""
from __future__ import annotations

import pytest
import torch

from engine import quant_q4
from engine.decoder import MIN_KV_CAPACITY, HFDecoder, LeanDecoder, lean_unsupported_reason, make_decoder
from engine.models import ModelRunner, load_causal_lm
from engine.tiny_models import ensure_tiny_model


def _steps(vocab: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """A prompt longer than the initial KV capacity and a decode schedule of mixed widths."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (MIN_KV_CAPACITY + 40,), generator=generator).tolist()
    widths = [1, 3, 1, 8, 2, 1, 5]
    return prompt, [torch.randint(0, vocab, (w,), generator=generator).tolist() for w in widths]


def _logits_trace(runner: ModelRunner, prompt: list[int], steps: list[list[int]]) -> list[torch.Tensor]:
    """Prefill, decode, roll back twice (as a rejected verify does), decode again; every logits row."""
    runner.prefill(prompt)
    trace = [runner.forward([prompt[-1]])]
    for i, step in enumerate(steps):
        trace.append(runner.forward(step))
        if i in (2, 4):
            runner.crop(runner.num_cached - len(step) + 1)        # keep the first token of the step only
    runner.prefill(prompt[:-7] + [3, 4, 5])                       # a second request sharing a prefix
    trace.append(runner.forward([5, 6]))
    return trace


def _assert_same_logits(model, chunk: int) -> None:
    lean = ModelRunner(model, "cpu", prefill_chunk_tokens=chunk, decoder_impl="lean")
    hf = ModelRunner(model, "cpu", prefill_chunk_tokens=chunk, decoder_impl="hf")
    assert isinstance(lean.decoder, LeanDecoder) and isinstance(hf.decoder, HFDecoder)
    prompt, steps = _steps(lean.vocab_size, seed=chunk)
    for i, (a, b) in enumerate(zip(_logits_trace(lean, prompt, steps), _logits_trace(hf, prompt, steps))):
        assert torch.equal(a, b), f"forward {i}: lean and transformers differ by {(a - b).abs().max().item()}"
    assert lean.cached_ids == hf.cached_ids and lean.num_cached == hf.num_cached
    assert lean.decoder.kv.capacity > MIN_KV_CAPACITY, "the prompt must have grown the KV buffers"


@pytest.mark.parametrize("dtype, quantization", [("float64", "none"), ("float32", "none"), ("bfloat16", "none"),
                                                 ("float32", "int8"), ("bfloat16", "int8-fast"),
                                                 ("bfloat16", "int4")])
def test_lean_equals_transformers_on_qwen2(session_cache_dir, dtype, quantization):
    path = ensure_tiny_model("tiny-random/verify", session_cache_dir)
    _assert_same_logits(load_causal_lm(path, None, "cpu", dtype, quantization), chunk=64)


@pytest.mark.skipif(not quant_q4.available(), reason=f"q4 kernel: {quant_q4.unavailable_reason()}")
def test_lean_runs_norms_and_gating_in_the_4bit_kernel_close_to_transformers(session_cache_dir, monkeypatch):
    """fp32 on the 4-bit kernel: each layer's two RMSNorms and its MLP's silu(gate) * up are prologues
    of the kernel's activation quantization (rounded in C, and a rounding of the int8 activations may
    flip on it: close to transformers' logits, not equal)."""
    path = ensure_tiny_model("tiny-random/verify", session_cache_dir)
    model = load_causal_lm(path, None, "cpu", "float32", "int4")
    prologues = []
    forward = quant_q4.GroupedLinear.forward

    def recorded(self, x, norm_weight=None, norm_eps=0.0, is_gated=False):
        if self is not model.lm_head:
            prologues.append("norm" if norm_weight is not None else "gated" if is_gated else "none")
        return forward(self, x, norm_weight, norm_eps, is_gated)
    monkeypatch.setattr(quant_q4.GroupedLinear, "forward", recorded)
    lean = ModelRunner(model, "cpu", prefill_chunk_tokens=64, decoder_impl="lean")
    hf = ModelRunner(model, "cpu", prefill_chunk_tokens=64, decoder_impl="hf")
    prompt, steps = _steps(lean.vocab_size, seed=5)
    hf_trace = _logits_trace(hf, prompt, steps)
    assert prologues and set(prologues) == {"none"}
    prologues.clear()
    lean_trace = _logits_trace(lean, prompt, steps)
    num_passes = prologues.count("gated")               # per layer: q/k/v, gate/up normed; o none; down gated
    assert num_passes > 0 and prologues.count("norm") == 2 * num_passes and prologues.count("none") == num_passes
    for i, (a, b) in enumerate(zip(lean_trace, hf_trace)):
        assert torch.allclose(a, b, rtol=0, atol=1e-2 * b.abs().max().item()), f"forward {i}: {(a - b).abs().max()}"


def test_lean_equals_transformers_on_a_padded_vocab_with_whole_prompt_prefill(session_cache_dir):
    path = ensure_tiny_model("tiny-random/verify-padded", session_cache_dir)
    _assert_same_logits(load_causal_lm(path, None, "cpu", "float32", "int8"), chunk=4096)


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         attention_bias=True, **overrides)
    return LlamaForCausalLM(config).to(torch.float32).eval()


def test_lean_equals_transformers_on_llama3_rope(session_cache_dir):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    model = _tiny_llama(rope_parameters=rope)
    assert model.model.rotary_emb.rope_type == "llama3"
    _assert_same_logits(model, chunk=100)


def test_unsupported_models_fall_back_to_transformers():
    model = _tiny_llama(hidden_act="gelu")
    assert "activation" in lean_unsupported_reason(model)
    assert isinstance(make_decoder(model, "cpu", "auto"), HFDecoder)
    with pytest.raises(ValueError, match="cannot run this model: activation"):
        make_decoder(model, "cpu", "lean")
    supported = _tiny_llama()
    assert lean_unsupported_reason(supported) is None
    assert isinstance(make_decoder(supported, "cpu", "auto"), LeanDecoder)
    assert isinstance(make_decoder(supported, "cuda:0", "auto"), HFDecoder)    # lean on CUDA only when asked
    assert isinstance(make_decoder(supported, "cpu", "hf"), HFDecoder)
    with pytest.raises(ValueError, match="decoder must be one of"):
        make_decoder(supported, "cpu", "fast")
