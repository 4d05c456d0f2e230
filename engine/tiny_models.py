"""Tiny random-weight model pairs for tests and for trying the API without downloads.

    tiny-random/verify   8-layer Qwen2, hidden 64, byte-level tokenizer (259 tokens), seed 0;
                         layers 2..7 are near-identity, so it costs ~4x the draft
    tiny-random/draft    2 layers: the verify model's first 2 layers plus small noise (agrees mostly)
    tiny-random/wrong    an independent random 2-layer model (almost never agrees: forces rollbacks)
    tiny-random/verify-padded   tiny-random/verify with TINY_PADDING_ROWS extra (random) embedding and
                         output rows past the tokenizer, as Qwen2.5-7B (152064) beside 0.5B (151936)

Built deterministically on first use into `<cache_dir>/tiny-random/<name>` (atomic rename, so
two workers building at once is safe). Builds in about a second.
"""
from __future__ import annotations

import os
import shutil
import tempfile

TINY_PREFIX = "tiny-random/"
TINY_VERSION = "v3"
TINY_VERIFY_LAYERS = 8
TINY_DRAFT_LAYERS = 2
TINY_EXTRA_LAYER_SCALE = 0.05
TINY_PADDING_ROWS = 16
TINY_DRAFT_NOISE = 0.01         # relative std of the draft weight noise: ~85 % greedy agreement
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def ensure_tiny_model(spec: str, cache_dir: str) -> str:
    name = spec[len(TINY_PREFIX):]
    if name not in ("verify", "draft", "wrong", "verify-padded"):
        raise ValueError(f"unknown tiny model {spec!r}: use tiny-random/verify, /draft, /wrong or /verify-padded")
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


def _tiny_config(tokenizer, num_layers: int):
    from transformers import Qwen2Config
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )


def _random_model(tokenizer, num_layers: int, seed: int):
    import torch
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_tiny_config(tokenizer, num_layers))
    with torch.no_grad():
        for param in model.parameters():          # larger weights: peaky, less tie-prone logits
            param.mul_(4.0)
    return model


def _build(name: str, out_dir: str) -> None:
    """verify: 8 layers, of which layers 2..7 barely touch the residual stream (so it costs ~4x
    the draft yet a 2-layer copy agrees with it); draft: verify's first 2 layers + small noise."""
    import torch
    from transformers import Qwen2ForCausalLM
    tokenizer = build_byte_tokenizer()
    verify = _random_model(tokenizer, TINY_VERIFY_LAYERS, seed=0)
    with torch.no_grad():
        for layer in verify.model.layers[TINY_DRAFT_LAYERS:]:
            layer.self_attn.o_proj.weight.mul_(TINY_EXTRA_LAYER_SCALE)
            layer.mlp.down_proj.weight.mul_(TINY_EXTRA_LAYER_SCALE)
    if name == "verify":
        model = verify
    elif name == "verify-padded":
        model = _padded(verify, TINY_PADDING_ROWS)
    elif name == "wrong":
        model = _random_model(tokenizer, TINY_DRAFT_LAYERS, seed=1)
    else:
        model = Qwen2ForCausalLM(_tiny_config(tokenizer, TINY_DRAFT_LAYERS))
        model.load_state_dict(verify.state_dict(), strict=False)    # extra verify layers are ignored
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in model.parameters():
                noise = torch.randn(param.shape, generator=gen) * param.std().clamp_min(1e-3)
                param.add_(noise * TINY_DRAFT_NOISE)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _padded(model, num_rows: int):
    """The same model with `num_rows` more embedding and output rows (random, like trained padding
    that was never hit): real tokens score as before; padding ids can still be sampled."""
    import torch
    gen = torch.Generator().manual_seed(11)
    old_rows = model.config.vocab_size
    model.resize_token_embeddings(old_rows + num_rows, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            tail = weight[old_rows:]
            tail.copy_(torch.randn(tail.shape, generator=gen) * weight[:old_rows].std())
    return model
