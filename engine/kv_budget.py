"""The KV cache memory budget: how many tokens of KV the verify worker may hold at once (torch-free).

    need = kv_tokens_needed(num_prompt_tokens, max_tokens, max_model_len)    # one request's reservation
    budget = KVBudget.plan(config, bytes_per_token, available_bytes)         # in the verify worker

Every running request reserves the KV its longest possible sequence needs (prompt + max_tokens,
capped by the context), so a running request can never run out of KV and nothing is preempted.
The supervisor starts a queued request only when its reservation fits beside the running ones
(first come, first served: a request that does not fit yet waits, and so do the ones behind it);
one that could never fit is refused at submit. The batch (engine/batch_decode.py) keeps the
memory it holds within the budget: a running slot never grows past its reservation, and the KV of
finished requests kept for prefix reuse is dropped, oldest first, when a new reservation needs room.

Budget: `kv_cache_memory_gb` when set; else (0, auto) room for `max_num_seqs` full-context
sequences, at most half the memory still available once the model is loaded (host memory on
CPU, free device memory on CUDA), and never less than one full-context sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

AUTO_MEMORY_FRACTION = 0.5
GiB = 1 << 30


def kv_tokens_needed(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> int:
    """Tokens of KV a request may come to hold: its prompt and every token it may generate."""
    return min(num_prompt_tokens + max_tokens, max_model_len)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Keys and values of one token in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * element_size


@dataclass(frozen=True)
class KVBudget:
    num_tokens: int
    bytes_per_token: int
    reason: str

    @classmethod
    def plan(cls, memory_gb: float, max_num_seqs: int, max_model_len: int, bytes_per_token: int,
             available_bytes: int | None) -> "KVBudget":
        if memory_gb > 0:
            return cls(int(memory_gb * GiB) // bytes_per_token, bytes_per_token, f"kv_cache_memory_gb {memory_gb:g}")
        wanted = max_num_seqs * max_model_len
        if available_bytes is None:
            return cls(wanted, bytes_per_token, f"{max_num_seqs} x max_model_len (available memory unknown)")
        affordable = int(AUTO_MEMORY_FRACTION * available_bytes) // bytes_per_token
        num_tokens = max(min(wanted, affordable), max_model_len)
        reason = (f"auto: {max_num_seqs} x max_model_len {max_model_len} = {wanted} tokens, at most "
                  f"{AUTO_MEMORY_FRACTION:g} x {available_bytes / GiB:.1f} GiB available = {affordable} tokens, "
                  f"at least one full context")
        return cls(num_tokens, bytes_per_token, reason)

    @property
    def memory_gb(self) -> float:
        return self.num_tokens * self.bytes_per_token / GiB

    def as_runtime(self) -> dict:
        return {"kv_budget_tokens": self.num_tokens, "kv_bytes_per_token": self.bytes_per_token,
                "kv_budget_gb": round(self.memory_gb, 3), "kv_budget_reason": self.reason}


def available_host_bytes(meminfo_path: str = "/proc/meminfo") -> int | None:
    """MemAvailable (Linux), or None where it cannot be read."""
    try:
        with open(meminfo_path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
