"""Test doubles for the server: a byte-level tokenizer and a FakeSupervisor (no torch, no models).

FakeSupervisor has EngineSupervisor's interface: one request at a time from a FIFO, emits the
tokens of a fixed text (`delay_s` apart, `tokens_per_step` at a time), stops after a token of
`stop_token_ids` as the engine does, gives prompt logprobs (-1.0 each) on its first output when
asked, honours cancel within one step, and can be told to fail mid-request or to report itself
unhealthy.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Callable

from engine.admission import Admission
from engine.messages import EngineOutput, GenerationRequest, RequestStats, TokenLogprob

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('bad role') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_byte_tokenizer(out_dir: str, chat_template: str = CHAT_TEMPLATE, extra_specials: tuple[str, ...] = ()) -> str:
    """A 256-byte BPE tokenizer (no merges) + ChatML specials (ids 256-258, then `extra_specials`,
    e.g. FIM markers) + chat template, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS + list(extra_specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")   # ids 259, 260, 261 below


def build_qwen_like_tokenizer(out_dir: str) -> str:
    """The byte tokenizer with Qwen2.5's chat template (tools, <tool_call>) and Qwen2.5-Coder's FIM tokens."""
    from tests.chat_templates import QWEN25_CHAT_TEMPLATE
    return build_byte_tokenizer(out_dir, QWEN25_CHAT_TEMPLATE, FIM_TOKENS)


class FakeSupervisor:
    """The EngineSupervisor interface without workers: the real line (engine/admission.py), and a
    thread per running request that streams `text` in steps of `tokens_per_step` bytes."""

    def __init__(self, tokenizer_dir: str, text: str = "Hello, wörld! 你好. " * 8, delay_s: float = 0.01,
                 tokens_per_step: int = 2, max_model_len: int = 512, start_delay_s: float = 0.0,
                 max_num_running: int = 1, max_queue_size: int | None = 16) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.text_ids = list(text.encode("utf-8"))          # byte tokenizer: id == byte
        self.eos_token_ids = [258]
        self.vocab_size = 259
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.tokens_per_step = tokens_per_step
        self.start_delay_s = start_delay_s
        self._line = Admission(max_model_len, max_queue_size)
        self._line.max_num_running = max_num_running          # requests decoded at once (one thread each)
        self.num_running_now = self.max_num_running_seen = 0
        self.healthy = True
        self.fail_after_tokens: int | None = None          # emit an error after this many tokens
        self.started = self.shut_down = False
        self.submitted: list[GenerationRequest] = []
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._worker_request_ids = itertools.count(1)
        self.restarts = 0

    # -- EngineSupervisor interface ------------------------------------------------
    def start(self) -> None:
        time.sleep(self.start_delay_s)
        self._thread = threading.Thread(target=self._loop, name="fake-supervisor", daemon=True)
        self._thread.start()
        self.started = True

    def submit(self, request: GenerationRequest, on_output: Callable[[EngineOutput], None],
               on_start: Callable[[], None] | None = None) -> None:
        request.params.validate()
        self._line.check_fits(request)
        self.submitted.append(request)
        self._line.put(request, on_output, on_start)

    def cancel(self, request_id: int) -> None:
        waiting = self._line.drop(request_id)
        if waiting is not None:
            waiting.on_output(EngineOutput(request_id, finished=True, finish_reason="cancelled"))
            return
        with self._lock:
            self._cancelled.add(request_id)

    def is_healthy(self) -> bool:
        return self.started and self.healthy and not self.shut_down

    def health(self) -> dict:
        ok = self.is_healthy()
        workers = {role: {"is_alive": ok, "pid": os.getpid(), "num_restarts": self.restarts,
                          "heartbeat_age_s": 0.1} for role in ("verify", "draft")}
        return {"is_healthy": ok, "workers": workers}

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.shut_down = True
        while (waiting := self._line.take()) is not None:
            waiting.on_output(EngineOutput(waiting.request.request_id, finished=True, finish_reason="error",
                                           error="engine shut down"))

    @property
    def max_num_running(self) -> int:
        return self._line.max_num_running

    @property
    def num_waiting(self) -> int:
        return self._line.num_waiting

    # -- fake engine -----------------------------------------------------------------
    def _is_cancelled(self, rid: int) -> bool:
        with self._lock:
            return rid in self._cancelled

    def _loop(self) -> None:
        """Start whoever may start (the line decides), each on a thread of its own."""
        while not self.shut_down:
            if not self._line.wait_for_arrival(timeout_s=0.05):
                continue
            waiting = self._line.take_startable(self._is_cancelled)
            if waiting is None:
                time.sleep(0.005)
                continue
            if self._is_cancelled(waiting.request.request_id):
                waiting.on_output(EngineOutput(waiting.request.request_id, finished=True, finish_reason="cancelled"))
                continue
            wid = next(self._worker_request_ids)
            self._line.place(wid, waiting)
            threading.Thread(target=self._run_placed, args=(wid, waiting), daemon=True).start()

    def _run_placed(self, wid: int, waiting) -> None:
        def emit(out: EngineOutput) -> None:
            if out.finished:
                self._line.remove(wid)             # the place is free before the caller hears of the finish
                with self._lock:
                    self.num_running_now -= 1
            waiting.on_output(out)
        with self._lock:
            self.num_running_now += 1
            self.max_num_running_seen = max(self.max_num_running_seen, self.num_running_now)
        self._run(waiting.request, emit)

    def _run(self, request: GenerationRequest, emit: Callable[[EngineOutput], None]) -> None:
        rid, params, t0 = request.request_id, request.params, time.monotonic()
        stats = RequestStats(num_prompt_tokens=len(request.prompt_token_ids))
        stream = self.text_ids + ([] if params.ignore_eos else self.eos_token_ids)
        if params.ignore_eos:
            stream = (stream * (params.max_tokens // max(1, len(stream)) + 1))
        done, reason = 0, "length"
        while True:
            if self._is_cancelled(rid):
                reason = "cancelled"
                break
            if self.shut_down:
                reason = "cancelled"
                break
            if self.fail_after_tokens is not None and done >= self.fail_after_tokens:
                stats.total_s = time.monotonic() - t0
                emit(EngineOutput(rid, finished=True, finish_reason="error", error="fake worker crashed",
                                  stats=stats))
                return
            time.sleep(self.delay_s)
            step = stream[done:done + min(self.tokens_per_step, params.max_tokens - done)]
            if not step:
                reason = "length" if done >= params.max_tokens else "stop"
                break
            done += len(step)
            stats.num_verify_steps += 1
            stats.num_drafts += 1
            stats.num_draft_tokens += 4
            stats.num_accepted_tokens += len(step) - 1
            stats.sum_draft_lead += 3
            stats.verify_busy_s += self.delay_s
            stats.draft_busy_s += self.delay_s
            lps = None
            if params.num_logprobs is not None:
                lps = [TokenLogprob(t, -0.5, [(t, -0.5), (65, -1.5)][:params.num_logprobs])
                       for t in step]
            stop_at = next((i for i, t in enumerate(step) if t in params.stop_token_ids), None)
            if stop_at is not None:
                done -= len(step) - stop_at - 1
                step, lps = step[:stop_at + 1], lps[:stop_at + 1] if lps else lps
            prompt_lps = None
            if params.num_prompt_logprobs is not None and stats.num_verify_steps == 1:
                prompt_lps = [None] + [TokenLogprob(t, -1.0, [(t, -1.0), (65, -2.0)][:params.num_prompt_logprobs])
                                       for t in request.prompt_token_ids[1:]]
            emit(EngineOutput(rid, token_ids=step, logprobs=lps, prompt_logprobs=prompt_lps))
            if stop_at is not None:
                reason = "stop"
                break
            if step[-1] in self.eos_token_ids and not params.ignore_eos:
                reason = "stop"
                break
            if done >= params.max_tokens:
                reason = "length"
                break
        stats.num_generated_tokens = done
        stats.total_s = time.monotonic() - t0
        with self._lock:
            self._cancelled.discard(rid)
        emit(EngineOutput(rid, finished=True, finish_reason=reason, stats=stats))
