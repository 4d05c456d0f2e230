"""The decoder stack of a causal LM and its KV cache: token ids in, last-layer hidden states out.

    decoder = make_decoder(model, device, "auto")
    hidden = decoder.forward(ids)        # ids [1, T] appended after decoder.num_cached tokens -> [T, H]
    decoder.crop(n)                      # keep KV of the first n positions (rollback)

    slot = decoder.new_slot()            # LeanDecoder only: more sequences, one pass for all
    hidden = decoder.forward_batch([(decoder.kv, ids_a), (slot, ids_b)])    # [T_a + T_b, H]

Two implementations with that interface:

    LeanDecoder   the Llama-family layer (Qwen2, Llama, Mistral without a sliding window) written out
                  on the HF module's own weights and norms, with a preallocated KV cache per layer:
                  append = a slice copy, rollback = a length. Fused q/k/v and gate/up quantized linears
                  (engine/quantization.py) run as one call each. Same aten ops in the same order as
                  transformers' eager layer with SDPA attention, so its logits equal the HF stack's
                  bit for bit (tests/test_decoder.py); it saves HF's per-call work (masks, cache
                  objects, rotary tables, output dataclasses): ~25 % of a one-token forward on a CPU
                  core (measured: Qwen2.5-1.5B int8 fp32 86 -> 65 ms, 0.5B int8-fast 43 -> 31 ms).
                  One exception: on the 4-bit kernel (fp32) the RMSNorm before q/k/v and gate/up and
                  the MLP's silu(gate) * up are the kernel's prologues (engine/quant_q4.py), rounded
                  in C: close to HF's, not equal (the norms: ~7 % of a one-token pass of the 1.5B
                  int4-mixed model on Zen 1).
    HFDecoder     transformers' own `model.model(...)` with a DynamicCache: every other architecture,
                  and CUDA (where launch overhead is the GPU's, and the lean path was never run).

Shapes: T new tokens, n cached, S = n + T, N new tokens of all sequences in a batch;
Hq query heads, Hkv KV heads, D head dim, G = Hq / Hkv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import DECODERS
from engine.quant_q4 import GroupedLinear
from engine.quantization import SliceOfGroup

LEAN_MODEL_TYPES = ("qwen2", "llama", "mistral")
LEAN_ROPE_TYPES = ("default", "linear", "llama3")      # position-independent tables (not "dynamic")
LEAN_NORM_CLASSES = ("Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
MIN_KV_CAPACITY = 256


def lean_unsupported_reason(model) -> str | None:
    """Why LeanDecoder cannot run `model` exactly as transformers does, or None if it can."""
    config = model.config
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model type {config.model_type!r} (lean: {', '.join(LEAN_MODEL_TYPES)})"
    if getattr(config, "use_sliding_window", False) or (config.model_type == "mistral" and config.sliding_window):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope_type = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope_type not in LEAN_ROPE_TYPES:
        return f"rope type {rope_type!r}"
    return None


def make_decoder(model, device: str, impl: str = "auto"):
    """The decoder for `model`: lean where supported (on CPU for "auto"), else transformers'."""
    if impl not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {impl!r}")
    reason = lean_unsupported_reason(model)
    if impl == "lean" and reason:
        raise ValueError(f"decoder lean cannot run this model: {reason}")
    is_lean = impl == "lean" or (impl == "auto" and reason is None and torch.device(device).type == "cpu")
    return LeanDecoder(model) if is_lean else HFDecoder(model)


class HFDecoder:
    """transformers' decoder stack with a DynamicCache."""

    name = "hf"

    def __init__(self, model):
        from transformers import DynamicCache
        self.model = model
        self._cache_cls = DynamicCache
        self.reset()

    def reset(self) -> None:
        self.cache = self._cache_cls(config=self.model.config)

    @property
    def num_cached(self) -> int:
        return int(self.cache.get_seq_length())

    def crop(self, num_tokens: int) -> None:
        num_remove = self.num_cached - num_tokens
        if num_remove > 0:
            self.cache.crop(-num_remove)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] -> hidden [T, H]."""
        out = self.model.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[0]


def _as_one_layer(members: list) -> list:
    """[the fused module] where the members are the slices of one quantized group, else the members."""
    if all(isinstance(m, SliceOfGroup) for m in members) and len({id(m._group) for m in members}) == 1:
        return [members[0].group_fused]
    return members


def _fused_call(members: list):
    """One call for linears that read the same input: the quantized group's fused module, or a cat."""
    layers = _as_one_layer(members)
    if len(layers) == 1:
        return layers[0].forward
    return lambda x: torch.cat([m(x) for m in layers], dim=-1)


def _normed_call(norm, members: list, is_fp32: bool):
    """hidden -> the members' outputs side by side, of norm(hidden). On the 4-bit kernel a fp32
    Llama-family RMSNorm is the prologue of its activation quantization (one pass over the row in C
    instead of ~6 tensor ops, two norms a layer); else the norm, then one call for the members."""
    layers = _kernel_layers(members)
    if layers and is_fp32 and _is_plain_rms_norm(norm) and norm.weight.dtype == torch.float32:
        weight, eps = norm.weight, float(norm.variance_epsilon)      # the parameter: read at each call
        if len(layers) == 1:
            return lambda x: layers[0].forward(x, weight, eps)
        return lambda x: torch.cat([layer.forward(x, weight, eps) for layer in layers], dim=-1)
    project, normed = _fused_call(members), _norm_call(norm)
    return lambda x: project(normed(x))


def _gated_call(down, is_fp32: bool):
    """gate_up [..., 2I] -> down(silu(gate) * up): on the 4-bit kernel the gating is the prologue of
    its activation quantization (no chunk, silu and product tensors)."""
    if is_fp32 and isinstance(down, GroupedLinear):
        return lambda gate_up: down.forward(gate_up, is_gated=True)
    project = down.forward

    def gated(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return project(F.silu(gate) * up)
    return gated


def _kernel_layers(members: list) -> list[GroupedLinear] | None:
    """The 4-bit-kernel layers whose outputs side by side are the members' (one fused layer, or each
    member's own), or None where any member runs elsewhere."""
    layers = _as_one_layer(members)
    return layers if all(isinstance(m, GroupedLinear) for m in layers) else None


def _is_plain_rms_norm(norm) -> bool:
    return type(norm).__name__ in LEAN_NORM_CLASSES and "forward" not in vars(norm)


def _norm_call(norm):
    """transformers' Llama-family RMSNorm in fp32 without its two no-op casts and module call (each
    op costs ~5 us on a slow core, two norms a layer): the same ops, so the same bits."""
    if not _is_plain_rms_norm(norm):
        return norm
    weight, eps = norm.weight, norm.variance_epsilon

    def rms_norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return norm(x)
        return weight * (x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_())
    return rms_norm


class KVSlot:
    """One sequence's KV cache in a LeanDecoder: per-layer [Hkv, capacity, D] buffers and a length.

    Append = a slice copy, rollback = a smaller length; the buffers double when they fill up.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.num_layers, self.shape = num_layers, (num_kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.capacity, self.num_cached = 0, 0
        self.max_capacity: int | None = None          # growth stops here (the request's KV reservation)
        self.keys: list[torch.Tensor] = []           # per layer [Hkv, capacity, D]
        self.values: list[torch.Tensor] = []
        self.ensure_capacity(MIN_KV_CAPACITY)

    def ensure_capacity(self, num_tokens: int) -> None:
        if num_tokens <= self.capacity:
            return
        capacity = max(num_tokens, 2 * self.capacity, MIN_KV_CAPACITY)
        if self.max_capacity is not None:
            capacity = max(num_tokens, min(capacity, self.max_capacity))
        self._reallocate(capacity)

    def limit_capacity(self, max_capacity: int) -> None:
        """Never hold more than `max_capacity` tokens (the buffers shrink now if they are larger);
        the cached prefix past it is dropped."""
        self.max_capacity = max_capacity
        self.num_cached = min(self.num_cached, max_capacity)
        if self.capacity > max_capacity:
            self._reallocate(max_capacity)

    def _reallocate(self, capacity: int) -> None:
        shape = (self.shape[0], capacity, self.shape[2])
        new_keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for old, new in zip(self.keys + self.values, new_keys + new_values):
            new[:, :self.num_cached] = old[:, :self.num_cached]
        self.keys, self.values, self.capacity = new_keys, new_values, capacity


class LeanDecoder:
    """Llama-family decoder layers over the HF module's weights, KV in preallocated per-sequence slots.

    `forward(ids)` runs the decoder's own slot (`self.kv`: the one-sequence interface above);
    `forward_batch` runs several sequences in one pass: their new tokens are packed into one row
    dimension for every linear layer (weights are read once for all of them) and only attention
    runs per sequence, against that sequence's slot.
    """

    name = "lean"

    def __init__(self, model):
        config, self.stack = model.config, model.model
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        weight = self.stack.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        is_fp32 = self.dtype == torch.float32                 # the kernel's prologues compute in fp32
        self.layers = []
        for layer in self.stack.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((_normed_call(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], is_fp32),
                                attn.o_proj.forward,
                                _normed_call(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], is_fp32),
                                _gated_call(mlp.down_proj, is_fp32), attn.scaling))
        self.rotary_capacity = 0
        self.cos = self.sin = None                   # [rotary_capacity, D] rotary tables (sin sign-folded)
        self.kv = self.new_slot()

    def new_slot(self) -> KVSlot:
        return KVSlot(len(self.layers), self.num_kv_heads, self.head_dim, self.dtype, self.device)

    @property
    def num_cached(self) -> int:
        return self.kv.num_cached

    def reset(self) -> None:
        self.kv.num_cached = 0

    def crop(self, num_tokens: int) -> None:
        self.kv.num_cached = min(self.kv.num_cached, num_tokens)

    def _ensure_rotary(self, num_tokens: int) -> None:
        """Rotary tables for positions [0, num_tokens), grown as slots grow."""
        if num_tokens <= self.rotary_capacity:
            return
        capacity = max(num_tokens, 2 * self.rotary_capacity, MIN_KV_CAPACITY)
        positions = torch.arange(capacity, device=self.device).view(1, -1)
        cos, sin = self.stack.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        half = cos.shape[-1] // 2
        # HF: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]. Here: x*cos + roll(x)*sin_signed,
        # roll(x) = [x2, x1], sin_signed = [-s1, s2]: the same products (x2*(-s1) == -x2*s1), fewer ops.
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.rotary_capacity = capacity

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] -> hidden [T, H], appending T positions to the decoder's own slot."""
        return self.forward_batch([(self.kv, ids[0])])

    @torch.inference_mode()
    def forward_batch(self, rows: list[tuple[KVSlot, torch.Tensor]]) -> torch.Tensor:
        """rows: (slot, ids [T_i]) per sequence, distinct slots -> hidden [N, H], N = sum T_i, rows in order.

        Sequence i's new tokens take positions n_i .. n_i + T_i - 1 of its slot (n_i = slot.num_cached).
        """
        lengths = [len(ids) for _, ids in rows]
        starts = [slot.num_cached for slot, _ in rows]
        for (slot, _), start, num_new in zip(rows, starts, lengths):
            slot.ensure_capacity(start + num_new)
            self._ensure_rotary(start + num_new)
        ids = rows[0][1] if len(rows) == 1 else torch.cat([ids for _, ids in rows])
        num_rows = ids.shape[0]
        hidden = self.stack.embed_tokens(ids.view(1, -1))                        # [1, N, H]
        cos = _packed([self.cos[start:start + n] for start, n in zip(starts, lengths)])[None, None]  # [1, 1, N, D]
        sin = _packed([self.sin[start:start + n] for start, n in zip(starts, lengths)])[None, None]
        # Causal within each sequence: its new token t sees positions <= n_i + t. One token sees all: no mask (as HF).
        masks = [None if n == 1 or start == 0 else
                 torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start)
                 for start, n in zip(starts, lengths)]
        offsets = [sum(lengths[:i]) for i in range(len(rows))]
        q_width, num_qk_heads, half_dim = self.num_heads * self.head_dim, self.num_heads + self.num_kv_heads, self.head_dim // 2
        for i, (qkv_proj, o_proj, gate_up_proj, gated_down_proj, scaling) in enumerate(self.layers):
            residual = hidden
            qkv = qkv_proj(hidden)                                                # [1, N, Hq*D + 2*Hkv*D]
            heads = qkv.view(1, num_rows, -1, self.head_dim).transpose(1, 2)      # [1, Hq + 2*Hkv, N, D]
            qk = heads[:, :num_qk_heads]                                          # q and k: one rotation
            qk = qk * cos + torch.roll(qk, half_dim, dims=-1) * sin
            q, k, v = qk[:, :self.num_heads], qk[:, self.num_heads:], heads[:, num_qk_heads:]   # [1, Hq|Hkv, N, D]
            attn = []
            for (slot, _), start, num_new, offset, mask in zip(rows, starts, lengths, offsets, masks):
                end, new = start + num_new, slice(offset, offset + num_new)
                slot.keys[i][:, start:end] = k[0, :, new]
                slot.values[i][:, start:end] = v[0, :, new]
                attn.append(F.scaled_dot_product_attention(
                    q[:, :, new], slot.keys[i][None, :, :end], slot.values[i][None, :, :end],
                    attn_mask=mask, is_causal=num_new > 1 and start == 0, scale=scaling,
                    enable_gqa=self.num_heads != self.num_kv_heads))              # [1, Hq, T_i, D]
            attn = _packed(attn, dim=2)                                           # [1, Hq, N, D]
            hidden = residual + o_proj(attn.transpose(1, 2).reshape(1, num_rows, q_width))
            residual = hidden
            hidden = residual + gated_down_proj(gate_up_proj(hidden))            # gate_up [1, N, 2I]
        for (slot, _), num_new in zip(rows, lengths):
            slot.num_cached += num_new
        return self.stack.norm(hidden)[0]


def _packed(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

