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

MODES = ("auto", "ar", "sync", "async")
DTYPES = ("auto", "bfloat16", "float16", "float32", "float64")
QUANTIZATIONS = ("auto", "none", "int8", "int8-fast", "int4", "int4-mixed")   # engine/quantization.py
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


@dataclass
class EngineConfig:
    verify_model: str
    draft_model: str | None = None
    mode: str = "auto"                   # auto | ar | sync | async (auto: fastest predicted, see cost_model)
    verify_device: str = "cpu"
    draft_device: str = "cpu"
    dtype: str = "auto"                  # auto: fp32 under CPU int8 layers, else bf16 where native, else fp32
    verify_quantization: str = "auto"    # auto | none | int8 | int8-fast | int4 | int4-mixed (engine/quantization.py)
    draft_quantization: str = "auto"
    decoder: str = "auto"                # auto (lean layers on CPU where supported) | lean | hf (engine/decoder.py)
    # CPU placement. None = no pinning. Defaults suit a 2-core machine. Without a draft worker (ar,
    # sync) the verify worker also takes the draft's cores, which would sit idle otherwise.
    verify_cores: str | None = "0"
    draft_cores: str | None = "1"
    verify_threads: int = 0               # 0 = one per core the worker runs on
    draft_threads: int = 0
    # Speculation.
    num_speculative_tokens: int = 0       # tokens proposed per verify (sync: drafted; async: checked); 0 = cost model
    max_draft_lead: int = 8               # async: draft may run this far past the committed prefix
    max_verify_tokens: int = 8            # most proposed tokens checked in one verify forward (cost model's cap)
    acceptance_prior: float = 0.7         # cost model: per-token acceptance assumed before any is observed
    prefill_chunk_tokens: int = 512       # longest prompt chunk fed in one forward
    max_num_seqs: int = 1                 # requests decoded at once, one pass for all (engine/batch_decode.py)
    max_num_batched_tokens: int = 64      # batching: tokens per pass while requests decode (prompt chunks fill it)
    max_queue_size: int = 16              # requests that may wait in the engine's line; more: LineFull (engine/admission.py)
    prefix_caching: bool = True           # keep the KV of the prefix shared with the previous request
    kv_cache_memory_gb: float = 0.0       # KV the running requests may reserve; 0 = auto (engine/kv_budget.py)
    prefill_cores: str | None = "auto"    # CPU verify prefill runs on these (one thread each); auto = verify + draft cores
    draft_lookup_ngram: int = 3           # async: draft self-speculates with prompt-lookup n-grams (0 = off)
    draft_vocab_size: int = 0             # draft scores only ids < N + running prompts' ids (0 = all; engine/draft_head.py)
    verify_lookup_ngram: int = 3          # async: verify appends n-gram guesses after the draft's tokens (0 = off)
    sampling_scheme: str = "coupled"      # how temperature > 0 stays lossless
    max_model_len: int = 2048
    gguf_file: str | None = None          # for a GGUF verify model inside a directory / hub repo
    draft_gguf_file: str | None = None
    # Liveness.
    worker_start_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 60.0
    step_timeout_s: float = 120.0         # longest a single forward may take before the worker counts as hung
    max_restarts: int = 3                 # restarts of a worker that dies at start-up before giving up
    cache_dir: str = field(default_factory=default_cache_dir)

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
                             self.draft_threads)

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
