"""Engine configuration: one small dataclass, validated once at construction.

Pure Python (no torch), so the frontend and the supervisor can build and check a
config without loading any model. Workers receive it pickled.

    cfg = EngineConfig(verify_model="tiny-random/verify", draft_model="tiny-random/draft", mode="async")
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.hardware import nf4_unavailable_reason

MODES = ("auto", "ar", "sync", "async")
DTYPES = ("auto", "bfloat16", "float16", "float32", "float64")
QUANTIZATIONS = ("auto", "none", "int8", "int8-fast", "int4", "int4-mixed", "nf4")   # engine/quantization.py
SAMPLING_SCHEMES = ("coupled", "rejection")
DECODERS = ("auto", "lean", "hf")   # engine/decoder.py
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


class ModelSettings(NamedTuple):
    """One model's settings (EngineConfig.model_settings("verify" | "draft"))."""
    model: str | None
    gguf_file: str | None
    device: str
    quantization: str
    threads: int
    num_head_ids: int = 0               # score only ids < N (+ running prompts' ids); 0 = all (draft only)


def default_cache_dir() -> str:
    """$AMUSD_CACHE_DIR, else ~/.cache/amusd: fetched models, converted weights, tiny models."""
    return os.environ.get("AMUSD_CACHE_DIR", os.path.expanduser("~/.cache/amusd"))


def _parse_cores(spec: str | None) -> tuple[int, ...] | None:
    """'0', '0-1', '0,2' -> core tuple; None/'' -> None (no pinning)."""
    if not spec:
        return None
    cores: list[int] = []
    for part in str(spec).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            cores.extend(range(int(lo), int(hi) + 1))
        else:
            cores.append(int(part))
    return tuple(cores)


def setting(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, **bounds):
    """A field of EngineConfig with the help text `amusd serve --help` shows for it (and bounds such
    as ge=0 that the server's settings check before the engine does)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, "bounds": bounds})


@dataclass
class EngineConfig:
    """Every engine setting: its type, default and help (server/settings.py makes the flags, env
    vars and YAML keys of the same names from these fields)."""
    verify_model: str = setting(help="verify (target) model: local dir, hub id, 'tiny-random/verify', or "
                                     "'default' (fetched 1.5B)")
    draft_model: str | None = setting(None, "draft model (same forms; 'default' = fetched 0.5B; none for mode ar)")
    mode: str = setting("auto", "decoding: auto | ar | sync | async (auto: the fastest by measured forward costs)")
    verify_device: str = setting("cpu", "cpu or cuda:N")
    draft_device: str = setting("cpu", "cpu or cuda:N")
    dtype: str = setting("auto", "auto | bfloat16 | float16 | float32 | float64 (auto: fp32 under CPU int8 layers, "
                                 "else bf16 where the device runs it natively, else fp32)")
    verify_quantization: str = setting("auto", "auto | none | int8 | int8-fast | int4 | int4-mixed | nf4 (auto: "
                                               "int4-mixed on CPUs where the 4-bit kernel builds (AVX2 class or VNNI), else int8; none on CUDA; "
                                               "engine/hardware.py)")
    draft_quantization: str = setting("auto", "auto | none | int8 | int8-fast | int4 | int4-mixed | nf4 (auto: "
                                              "nf4 on AVX512_BF16 CPUs, else int8-fast; none on CUDA)")
    decoder: str = setting("auto", "auto | lean | hf: the layers that run the model (auto: amusd's lean "
                                   "Qwen2/Llama layers on CPU where supported, else transformers'; same logits)")
    # CPU placement. Defaults suit a 2-core machine. Without a draft worker (ar, sync) the verify
    # worker also takes the draft's cores, which would sit idle otherwise.
    verify_cores: str | None = setting("0", "CPU cores for the verify worker, e.g. '0' or '0-1' (none = no pinning)")
    draft_cores: str | None = setting("1", "CPU cores for the draft worker")
    verify_threads: int = setting(0, "torch threads in the verify worker (0 = one per core it runs on; without a "
                                     "draft worker it also takes draft_cores)")
    draft_threads: int = setting(0, "torch threads in the draft worker (0 = one per core it runs on)")
    # Speculation.
    num_speculative_tokens: int = setting(0, "tokens proposed per verify (sync: drafted, async: checked); 0 = "
                                             "chosen per step by the cost model")
    acceptance_prior: float = setting(0.7, "cost model: acceptance rate assumed before any is observed")
    prefill_chunk_tokens: int = setting(512, "longest prompt chunk per forward")
    max_num_seqs: int = setting(1, "requests decoded at once, one forward pass for all (continuous batching; "
                                   "engine/batch_decode.py)")
    max_num_batched_tokens: int = setting(64, "batching: tokens in one forward pass while requests are decoding "
                                              "(their tokens + prompt chunks), so that a long prompt does not "
                                              "freeze the running streams")
    max_queue_size: int = setting(16, "requests that may wait in the engine's line; more get 429", ge=0)
    prefix_caching: bool = setting(True, "reuse the KV of the prefix shared with the previous request (system "
                                         "prompt, earlier turns)")
    kv_cache_memory_gb: float = setting(0.0, "KV cache the running requests may reserve, GiB (0 = auto: "
                                             "max_num_seqs full contexts, at most half the memory available)", ge=0)
    prefill_cores: str | None = setting("auto", "CPU cores the verify prefills on, one thread each (auto = verify "
                                                "+ draft cores: the draft idles meanwhile)")
    max_draft_lead: int = setting(8, "async: how far the draft may run ahead")
    max_verify_tokens: int = setting(8, "most proposed tokens per verify (the cost model's cap)")
    draft_lookup_ngram: int = setting(3, "async: prompt-lookup n-gram self-speculation in the draft (0 = off)")
    draft_vocab_size: int = setting(0, "draft (sync, async): score only token ids < N plus the running prompts' "
                                       "ids (0 = full vocabulary; engine/draft_head.py)")
    verify_lookup_ngram: int = setting(3, "async: n-gram guesses the verify appends after the draft's tokens "
                                          "(0 = off)")
    sampling_scheme: str = setting("coupled", "lossless sampling at temperature > 0: coupled | rejection")
    max_model_len: int = setting(2048, "context length: prompt + generated tokens")
    gguf_file: str | None = setting(None, "GGUF file of the verify model (inside a directory or hub repo)")
    draft_gguf_file: str | None = setting(None, "GGUF file of the draft model")
    # Liveness.
    worker_start_timeout_s: float = setting(300.0, "worker load time limit")
    heartbeat_timeout_s: float = setting(60.0, "silent worker counts as dead")
    step_timeout_s: float = setting(120.0, "longest single forward before the worker counts as hung")
    max_restarts: int = setting(3, "worker restarts at start-up before giving up")
    cache_dir: str = setting(help="model cache (fetched / converted models)", default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "auto" and not self.draft_model:
            self.mode = "ar"
        if self.mode != "ar" and not self.draft_model:
            raise ConfigError(f"mode {self.mode!r} needs a draft_model")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("verify_quantization", "draft_quantization"):
            if getattr(self, name) not in QUANTIZATIONS:
                raise ConfigError(f"{name} must be one of {QUANTIZATIONS}, got {getattr(self, name)!r}")
        for role in ("verify", "draft"):
            reason = nf4_unavailable_reason(getattr(self, f"{role}_quantization"), getattr(self, f"{role}_device"))
            if reason:
                raise ConfigError(f"{role}_quantization nf4: {reason}")
        if not 0.0 < float(self.acceptance_prior) < 1.0:
            raise ConfigError(f"acceptance_prior must be in (0, 1), got {self.acceptance_prior}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.sampling_scheme not in SAMPLING_SCHEMES:
            raise ConfigError(f"sampling_scheme must be one of {SAMPLING_SCHEMES}, got {self.sampling_scheme!r}")
        for name in ("verify_device", "draft_device"):
            if not _DEVICE_RE.match(getattr(self, name)):
                raise ConfigError(f"{name} must be 'cpu' or 'cuda:N', got {getattr(self, name)!r}")
            if getattr(self, name) == "cuda":
                setattr(self, name, "cuda:0")            # the workers compare and pin device strings
        for name in ("verify_cores", "draft_cores", "prefill_cores"):
            if getattr(self, name) == "auto":
                continue
            try:
                _parse_cores(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"{name}: cannot parse core list {getattr(self, name)!r}") from exc
        positive = ("max_draft_lead", "max_verify_tokens", "max_model_len", "prefill_chunk_tokens", "max_num_seqs",
                    "max_num_batched_tokens")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("draft_lookup_ngram", "verify_lookup_ngram", "draft_vocab_size", "num_speculative_tokens",
                     "verify_threads", "draft_threads", "max_queue_size"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not float(self.kv_cache_memory_gb) >= 0:
            raise ConfigError(f"kv_cache_memory_gb must be >= 0 (0 = auto), got {self.kv_cache_memory_gb}")
        for name in ("worker_start_timeout_s", "heartbeat_timeout_s", "step_timeout_s"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be > 0")

    def warnings(self) -> list[str]:
        """Settings that work but probably do not do what the user wants."""
        found = []
        if self.max_num_seqs > 1 and self.mode == "async" and self.async_unbatched_reason:
            found.append(f"max_num_seqs {self.max_num_seqs}: async runs one request at a time here "
                         f"({self.async_unbatched_reason})")
        if self.uses_draft_worker and self.verify_device == self.draft_device and self.verify_device != "cpu":
            found.append(f"draft and verify workers share {self.verify_device}: without CUDA MPS their kernels "
                         "time-slice rather than run concurrently, so async speculation gains little")
        return found

    @property
    def uses_draft_worker(self) -> bool:
        """Only async runs a separate draft process; sync drafts on the verify worker's device.

        `auto` starts as async (both workers measure their forward costs), then settles on a mode.
        """
        return self.mode in ("async", "auto")

    @property
    def async_unbatched_reason(self) -> str | None:
        """Why async cannot batch with these settings (None: it can; engine/async_batch.py)."""
        if "cuda" in self.verify_device + self.draft_device:
            return "async batching runs on CPU workers only (the lean decoder)"
        if self.decoder == "hf":
            return "batching needs the lean decoder"
        if self.sampling_scheme == "rejection":
            return "async batching samples with the coupled scheme only"
        return None

    @property
    def is_async_batched(self) -> bool:
        """async with one row of shared state per sequence and both workers batching."""
        return self.mode == "async" and self.max_num_seqs > 1 and self.async_unbatched_reason is None

    @property
    def num_shared_slots(self) -> int:
        """Rows of shared state (engine/shared_state.py): one per sequence when async batches."""
        return self.max_num_seqs if self.is_async_batched else 1

    @property
    def has_peer_buffers(self) -> bool:
        """Do the workers hand each other buffers at start-up (so they must restart together)?

        Only the rejection-sampling q ring: draft tokens meet in the supervisor's shared segment
        whatever the devices (engine/token_channel.py).
        """
        return self.uses_draft_worker and self.sampling_scheme == "rejection"

    def cores_of(self, role: str) -> tuple[int, ...] | None:
        """The cores a worker runs on. Without a draft worker the CPU verify takes the draft's cores too."""
        if role != "verify":
            return _parse_cores(self.draft_cores)
        cores = _parse_cores(self.verify_cores)
        draft_cores = _parse_cores(self.draft_cores)
        if self.uses_draft_worker or self.verify_device != "cpu" or cores is None or draft_cores is None:
            return cores
        return tuple(sorted(set(cores) | set(draft_cores)))

    def model_settings(self, role: str) -> ModelSettings:
        """The settings of the verify or the draft model: the one place a role picks its fields."""
        if role == "verify":
            return ModelSettings(self.verify_model, self.gguf_file, self.verify_device, self.verify_quantization,
                                 self.verify_threads)
        return ModelSettings(self.draft_model, self.draft_gguf_file, self.draft_device, self.draft_quantization,
                             self.draft_threads, self.draft_vocab_size)

    def threads_of(self, role: str) -> int | None:
        """torch threads of a worker: as set, else one per core it runs on (None: unpinned, torch's default)."""
        threads = self.model_settings(role).threads
        if threads:
            return int(threads)
        cores = self.cores_of(role)
        return len(cores) if cores else None

    @property
    def verify_prefill_cores(self) -> tuple[int, ...] | None:
        """Cores the CPU verify worker prefills on: the draft's core is mostly idle while it does."""
        if self.prefill_cores != "auto":
            return _parse_cores(self.prefill_cores)
        if self.verify_device != "cpu" or self.cores_of("verify") is None:
            return None
        draft_cores = self.cores_of("draft") if self.draft_model and self.draft_device == "cpu" else None
        return tuple(sorted(set(self.cores_of("verify")) | set(draft_cores or ())))

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
