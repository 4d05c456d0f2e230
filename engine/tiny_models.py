"""Tiny random-weight model pairs for tests and for trying the API without downloads.

    tiny-random/verify   2-layer Qwen2, hidden 64, byte-level tokenizer (259 tokens), seed 0
    tiny-random/draft    the verify model's weights plus small noise (agrees with it most of the time)
    tiny-random/wrong    an independent random model (almost never agrees: forces rollbacks)

Built deterministically on first use into `<cache_dir>/tiny-random/<name>` (atomic rename, so
two workers building at once is safe). Builds in about a second.
"""
from __future__ import annotations

import os
import shutil
import tempfile

TINY_PREFIX = "tiny-random/"
TINY_VERSION = "v2"
TINY_DRAFT_NOISE = 0.01         # relative std of the draft weight noise: ~85 % greedy agreement
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def ensure_tiny_model(spec: str, cache_dir: str) -> str:
    name = spec[len(TINY_PREFIX):]
    if name not in ("verify", "draft", "wrong"):
        raise ValueError(f"unknown tiny model {spec!r}: use tiny-random/verify, /draft or /wrong")
    out_dir = os.path.join(cache_dir, "tiny-random", f"{name}-{TINY_VERSION}")
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(out_dir))
    try:
        _build(name, tmp_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise            # a concurrent builder won the race otherwise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte plus chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_char))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(name: str, out_dir: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = build_byte_tokenizer()
    vocab_size = len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1 if name == "wrong" else 0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():          # larger weights: peaky, less tie-prone logits
            param.mul_(4.0)
        if name == "draft":
            gen = torch.Generator().manual_seed(7)
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=gen) * param.std().clamp_min(1e-3)
                param.add_(noise * TINY_DRAFT_NOISE)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
