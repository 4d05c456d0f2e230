"""Model loading and the per-worker `ModelRunner` (a causal LM plus its KV cache).

Model specs a config may name:
    default:verify / default:draft    the default pair, fetched once by `amusd fetch-models`
    tiny-random/<name>               tiny random-weight Qwen2 models built here in seconds (tests, demos)
    /path/to/dir                     a Hugging Face model directory
    /path/to/model.gguf              a GGUF file (transformers' `gguf_file`; needs `gguf` + `accelerate`)
    org/name                         a hub id (only where a network exists)

Runs inside the worker processes (imports torch).
"""
from __future__ import annotations

import contextlib
import os

import torch

from engine.config import ConfigError
from engine.tiny_models import TINY_PREFIX, ensure_tiny_model

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def resolve_model_spec(spec: str, cache_dir: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return (local dir or hub id, gguf file name or None) for a model spec."""
    if spec.startswith("default:"):
        from engine.fetch import ensure_default_models
        dirs = dict(zip(("verify", "draft"), ensure_default_models(cache_dir)))
        role = spec.split(":", 1)[1]
        if role not in dirs:
            raise ConfigError(f"unknown default model {spec!r}: use default:verify or default:draft")
        return dirs[role], None
    if spec.startswith(TINY_PREFIX):
        return ensure_tiny_model(spec, cache_dir), None
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ConfigError(f"GGUF file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.sep in spec and not os.path.exists(spec) and spec.startswith((".", "/", "~")):
        raise ConfigError(f"model directory not found: {spec}")
    return os.path.expanduser(spec), gguf_file


def load_causal_lm(path: str, gguf_file: str | None, device: str, dtype: str, quantization: str = "none",
                   keep_float_head: bool = False, is_draft: bool = False):
    """Load a causal LM in `dtype` (concrete, not "auto") on `device`, then quantize its linears.

    keep_float_head: keep the output matrix in float (`amusd_float_head`, bf16 when untied: the
    checkpoint's own precision) for a draft vocabulary subset (engine/draft_head.py). is_draft: the
    layers need not be row-independent (engine/quant_nf4.py: Nf4WithWideTwin)."""
    from transformers import AutoModelForCausalLM

    from engine.quantization import quantize_model
    kwargs = {"dtype": DTYPES[dtype]}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    # A tied head shares the input embedding: that float matrix stays anyway.
    is_tied = bool(getattr(model.config, "tie_word_embeddings", False))
    model.amusd_float_head = model.get_input_embeddings().weight if is_tied else None
    if keep_float_head and not is_tied and quantization != "none":
        model.amusd_float_head = model.get_output_embeddings().weight.detach().to(torch.bfloat16)
    with torch.inference_mode():
        quantize_model(model, quantization, is_draft=is_draft)
    return model


def num_output_rows(model) -> int:
    """Rows of the output layer (the vocabulary the model scores; may be padded past the tokenizer's)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0] if hasattr(head, "weight") else head.out_features)


def eos_token_ids_of(model) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = model.config.eos_token_id
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def check_same_vocab(verify_model, draft_model, verify_dir: str, draft_dir: str) -> None:
    """Refuse a pair that cannot share token ids.

    The tokenizers must be the same; output rows may differ by padding past the tokenizer
    (Qwen2.5-7B scores 152064 rows, 0.5B 151936), as long as the draft's rows are no more than the
    verify's and cover every tokenizer id. Rejection sampling pads the draft's q rows with zeros.
    """
    verify_rows, draft_rows = num_output_rows(verify_model), num_output_rows(draft_model)
    if draft_rows > verify_rows:
        raise ConfigError(f"the draft {draft_dir} scores {draft_rows} tokens, more than the verify {verify_dir} "
                          f"({verify_rows}): its proposals could be ids the verify does not have")
    from transformers import AutoTokenizer
    try:
        verify_tok = AutoTokenizer.from_pretrained(verify_dir)
        draft_tok = AutoTokenizer.from_pretrained(draft_dir)
    except (OSError, ValueError):
        if draft_rows != verify_rows:     # e.g. a GGUF-only dir: only the row counts can be compared
            raise ConfigError(f"cannot read the tokenizers of {draft_dir} and {verify_dir}, and their output "
                              f"rows differ ({draft_rows} vs {verify_rows}): cannot tell whether they share ids")
        return
    if verify_tok.get_vocab() != draft_tok.get_vocab():
        raise ConfigError(f"draft tokenizer ({draft_dir}) differs from verify tokenizer ({verify_dir})")
    if len(draft_tok) > draft_rows:
        raise ConfigError(f"the draft {draft_dir} has {draft_rows} output rows for {len(draft_tok)} tokenizer ids")


MIN_WIDE_PREFILL_TOKENS = 64     # shorter prefills stay on the worker's own core: the draft prefills too


class PrefillPlacement:
    """Prefill on more cores than decode: threads and affinity widened around each long prefill.

    Below MIN_WIDE_PREFILL_TOKENS the second thread mostly competes with the draft worker's own
    prefill of the same prompt (measured: chat TTFT p50 0.95 s -> 1.33 s when always widened;
    HumanEval prompts of 80-120 tokens: -25 %).

    Linux affinity is per thread: the calling thread is moved to `prefill_cores` and torch gets one
    thread per core, then both are put back (its extra OpenMP thread then sleeps).
    """

    def __init__(self, prefill_cores: tuple[int, ...]):
        self.prefill_cores = set(prefill_cores)

    @contextlib.contextmanager
    def widened(self):
        decode_cores, decode_threads = os.sched_getaffinity(0), torch.get_num_threads()
        cores = (self.prefill_cores & set(range(os.cpu_count() or 1))) or decode_cores
        try:
            os.sched_setaffinity(0, cores)
        except OSError:
            yield
            return
        torch.set_num_threads(len(cores))
        try:
            yield
        finally:
            torch.set_num_threads(decode_threads)
            os.sched_setaffinity(0, decode_cores)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share (the KV a prefix cache can keep)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class ModelRunner:
    """One causal LM with a KV cache (engine/decoder.py) holding KV for a prefix of one sequence.

    Invariant kept by callers: the cache holds every token of the sequence except the
    last one, which is the next forward's first input ("pending token").
    """

    def __init__(self, model, device: str, prefill_chunk_tokens: int = 512, is_prefix_cached: bool = True,
                 decoder_impl: str = "auto"):
        from engine.decoder import make_decoder
        self.model = model
        self.device = torch.device(device)
        self.decoder = make_decoder(model, device, decoder_impl)         # the layers and their KV cache
        self.lm_head = model.get_output_embeddings()
        self.vocab_size = num_output_rows(model)
        self.num_input_rows = int(model.get_input_embeddings().num_embeddings)
        self.is_mapping_unknown_ids = False             # draft of a padded verify: see _input_ids
        self._cached_ids: list[int] = []                # the tokens whose KV the cache holds ...
        self._unsynced_ids: list[torch.Tensor] = []      # ... and device tensors not yet copied to host
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.is_prefix_cached = is_prefix_cached
        self.prefill_placement: PrefillPlacement | None = None     # set by the verify worker on CPU
        self.subset_head = None                        # draft_vocab_size: engine/draft_head.py

    def use_vocab_subset(self, num_ids: int, quantization: str) -> None:
        """Score only ids < num_ids (+ the running prompts' ids) from now on: a draft-only speed-up
        (the verify scores the whole vocabulary, so output is unchanged)."""
        from engine.draft_head import SubsetHead
        if not 0 < num_ids < self.vocab_size:
            return
        float_head = getattr(self.lm_head, "weight", None)
        if float_head is None:
            float_head = getattr(self.model, "amusd_float_head", None)
        if float_head is None:
            raise ValueError("draft_vocab_size needs the float output matrix (load_causal_lm(keep_float_head=True))")
        self.subset_head = SubsetHead(float_head.detach(), num_ids, quantization, self.decoder.dtype)

    def score_prompt(self, key, prompt_ids) -> None:
        """With a vocabulary subset: a running request's prompt ids are scored too, until forget_prompt(key)."""
        if self.subset_head is not None:
            self.subset_head.score_prompt(key, prompt_ids)

    def forget_prompt(self, key) -> None:
        if self.subset_head is not None:
            self.subset_head.forget_prompt(key)

    def reset(self) -> None:
        self.decoder.reset()
        self._cached_ids, self._unsynced_ids = [], []

    @property
    def cached_ids(self) -> list[int]:
        """Token ids whose KV the cache holds (device tensors are read back only when asked)."""
        for ids in self._unsynced_ids:
            self._cached_ids.extend(ids.tolist())
        self._unsynced_ids.clear()
        return self._cached_ids

    @property
    def num_cached(self) -> int:
        return self.decoder.num_cached

    def crop(self, num_tokens: int) -> None:
        """Keep KV for the first `num_tokens` positions only."""
        if self.num_cached > num_tokens:
            self.decoder.crop(num_tokens)
            del self.cached_ids[num_tokens:]

    @torch.inference_mode()
    def forward(self, token_ids, last_only: bool = False) -> torch.Tensor:
        """Append `token_ids` (list or 1-D tensor) to the cache; return logits [n, V] (or [1, V])."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).view(1, -1)
        hidden = self.decoder.forward(self._input_ids(ids))                               # [n, H]
        if isinstance(token_ids, torch.Tensor) and token_ids.device.type != "cpu":
            self._unsynced_ids.append(ids[0])            # no device sync on the draft's hot path
        else:
            self._cached_ids.extend(ids[0].tolist())
        if last_only:
            hidden = hidden[-1:]
        return self.logits(hidden)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer: last-layer hidden states [n, H] -> logits [n, V]."""
        return self.lm_head(hidden) if self.subset_head is None else self.subset_head(hidden)

    def _input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """A draft beside a verify with padded rows may be fed a padding id the verify committed: it
        has no embedding for it, so it reads id 0 there (only its guesses suffer; the verify decides)."""
        if not self.is_mapping_unknown_ids:
            return ids
        return ids.masked_fill(ids >= self.num_input_rows, 0)

    def prefills_wide(self, token_ids: list[int], is_scoring: bool = False) -> bool:
        """Does prefill(token_ids) run on `prefill_placement`'s cores (the draft worker's too): at
        least MIN_WIDE_PREFILL_TOKENS not in the prefix cache (none are when scoring the prompt)?"""
        if self.prefill_placement is None:
            return False
        is_reusing = self.is_prefix_cached and not is_scoring
        num_reused = common_prefix_length(self.cached_ids, token_ids[:-1]) if is_reusing else 0
        return len(token_ids) - 1 - num_reused >= MIN_WIDE_PREFILL_TOKENS

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], hidden_out: list[torch.Tensor] | None = None) -> int:
        """Fill the cache with all but the last token (the pending one); return how many were reused.

        Prefix cache: the KV of the longest common prefix with what the cache already holds (the
        previous request's prompt and output) is kept, so a shared system prompt or a follow-up
        turn is not computed again. The rest is fed in chunks of `prefill_chunk_tokens`.
        hidden_out: a list that receives each chunk's last-layer hidden states [chunk, H], for the
        logits of every prompt position (prompt logprobs); the prefix cache is bypassed then.
        """
        target = list(token_ids[:-1])
        is_wide = self.prefills_wide(token_ids, is_scoring=hidden_out is not None)
        if not self.is_prefix_cached or hidden_out is not None:
            self.reset()
        num_reused = common_prefix_length(self.cached_ids, target)
        self.crop(num_reused)
        placement = self.prefill_placement.widened() if is_wide else contextlib.nullcontext()
        with placement:
            for start in range(num_reused, len(target), self.prefill_chunk_tokens):
                chunk = target[start:start + self.prefill_chunk_tokens]
                ids = torch.as_tensor(chunk, dtype=torch.long, device=self.device).view(1, -1)
                hidden = self.decoder.forward(self._input_ids(ids))                   # [chunk, H]
                self._cached_ids.extend(chunk)
                if hidden_out is not None:
                    hidden_out.append(hidden)
        return num_reused
