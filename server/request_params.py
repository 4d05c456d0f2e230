"""Request fields -> SamplingParams: limits, aliases, the model's sampling defaults, token ids.

    factory = SamplingParamsFactory(settings, vocab_size, max_model_len, sampling_defaults)
    factory.check_request(req)                                   # what needs no prompt
    params = factory.build(req, prompt_len, max_tokens, num_logprobs, num_prompt_logprobs)

Aliases: llama-server's `repeat_penalty` (= repetition_penalty) and `n_predict` (= max_tokens;
-1 = until the context is full); a request that sets both names to different values gets a 400.
Each of temperature / top_p / top_k / min_p / repetition_penalty that a request leaves unset takes
the model's generation_config.json value when `generation_config` is `auto` (as vLLM does), else
the neutral value (temperature: the `default_temperature` setting).
"""
from __future__ import annotations

import json
import os
from typing import Any

from engine.messages import SamplingParams
from server import protocol as P
from server.errors import OpenAIError
from server.settings import Settings
from server.structured_outputs import grammar_spec

MAX_STOP_STRING_CHARS = 1024
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_NEUTRAL = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def load_sampling_defaults(setting: str, model_dir: str) -> dict[str, float]:
    """The sampling defaults of generation_config.json: `setting` is auto (the model's directory),
    none, or a directory holding a generation_config.json (vLLM's --generation-config)."""
    if setting == "none":
        return {}
    path = os.path.join(model_dir if setting == "auto" else setting, "generation_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    defaults = {k: config[k] for k in SAMPLING_DEFAULT_KEYS
                if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)}
    if "top_k" in defaults:
        defaults["top_k"] = int(defaults["top_k"])
    return defaults


def check_in_vocab(token_ids: Any, vocab_size: int, param: str, label: str = "") -> None:
    """400 naming `param` when a token id is outside [0, vocab_size); `label` prefixes the message."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise OpenAIError(f"{label}token id {bad} is out of vocabulary (size {vocab_size})", param=param)


def check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError("the text contains invalid Unicode (a lone surrogate)", param=param) from None


def _alias(req: Any, name: str, alias: str) -> Any:
    """The value of `name`, or of its alias when only that is set; 400 when both differ."""
    value, other = getattr(req, name), getattr(req, alias)
    if value is not None and other is not None and value != other:
        raise OpenAIError(f"{alias} is an alias of {name}; they differ ({other} vs {value})", param=alias)
    return value if value is not None else other


class SamplingParamsFactory:
    def __init__(self, settings: Settings, vocab_size: int, max_model_len: int,
                 sampling_defaults: dict[str, float]) -> None:
        self.settings, self.vocab_size, self.max_model_len = settings, vocab_size, max_model_len
        self.sampling_defaults = sampling_defaults   # from generation_config.json

    def defaults_in_force(self) -> dict[str, float]:
        """What a request that sets none of the sampling fields gets (shown in /v1/models)."""
        neutral = {"temperature": self.settings.default_temperature, **_NEUTRAL}
        return {k: self.sampling_defaults.get(k, neutral[k]) for k in SAMPLING_DEFAULT_KEYS}

    def check_request(self, req: P._SamplingRequest, model_name: str) -> None:
        if req.model is not None and req.model != model_name:
            raise OpenAIError(f"The model `{req.model}` does not exist.", 404, param="model",
                              code="model_not_found")
        if req.n is not None and not 1 <= req.n <= self.settings.max_choices:
            raise OpenAIError(f"n must be in [1, {self.settings.max_choices}], got {req.n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise OpenAIError("stream_options can only be set when stream=true", param="stream_options")
        if req.stream_options is not None and req.stream_options.continuous_usage_stats:
            raise OpenAIError("stream_options.continuous_usage_stats is not supported",
                              param="stream_options.continuous_usage_stats")
        stops = req.stop_list()
        if len(stops) > self.settings.max_stop_strings:
            raise OpenAIError(f"at most {self.settings.max_stop_strings} stop strings are allowed", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise OpenAIError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters", param="stop")
        for stop in stops:
            check_unicode(stop, "stop")
        check_in_vocab(req.stop_token_ids or [], self.vocab_size, "stop_token_ids", "stop_token_ids: ")

    def max_tokens(self, req: P._SamplingRequest, requested: int | None, is_set: bool) -> int | None:
        """`requested` (max_tokens / max_completion_tokens, `is_set` if the client sent it) or n_predict."""
        if req.n_predict is None:
            return requested
        n_predict = None if req.n_predict == -1 else req.n_predict
        if is_set and requested != n_predict:
            raise OpenAIError(f"n_predict is an alias of max_tokens; they differ ({req.n_predict} vs "
                              f"{requested})", param="n_predict")
        return n_predict

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (bias or {}).items():
            try:
                tid = int(key)
            except ValueError:
                raise OpenAIError(f"logit_bias: key {key!r} is not a token id", param="logit_bias") from None
            check_in_vocab([tid], self.vocab_size, "logit_bias", "logit_bias: ")
            out[tid] = value
        return out

    def _max_tokens_in_context(self, prompt_len: int, max_tokens: int | None) -> int:
        s = self.settings
        if prompt_len == 0:
            raise OpenAIError("the prompt must not be empty", param="prompt")
        if prompt_len > min(s.max_prompt_tokens, self.max_model_len - 1):
            raise OpenAIError(f"the prompt has {prompt_len} tokens; at most "
                              f"{min(s.max_prompt_tokens, self.max_model_len - 1)} are allowed", param="prompt")
        if max_tokens is None:
            return min(s.max_tokens_limit, self.max_model_len - prompt_len)
        if isinstance(max_tokens, int) and max_tokens > s.max_tokens_limit:
            raise OpenAIError(f"max_tokens must be <= {s.max_tokens_limit}, got {max_tokens}", param="max_tokens")
        if isinstance(max_tokens, int) and prompt_len + max_tokens > self.max_model_len:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                              f"{max_tokens} for the completion).", param="max_tokens")
        return max_tokens

    def build(self, req: P._SamplingRequest, prompt_len: int, max_tokens: int | None,
              num_logprobs: int | None, num_prompt_logprobs: int | None = None) -> SamplingParams:
        defaults = self.defaults_in_force()
        pick = lambda name, value: value if value is not None else defaults[name]
        top_k = pick("top_k", req.top_k)
        params = SamplingParams(
            max_tokens=self._max_tokens_in_context(prompt_len, max_tokens),
            temperature=pick("temperature", req.temperature), top_p=pick("top_p", req.top_p),
            top_k=0 if top_k == -1 else top_k, min_p=pick("min_p", req.min_p), seed=req.seed,
            num_logprobs=num_logprobs, num_prompt_logprobs=num_prompt_logprobs,
            ignore_eos=bool(req.ignore_eos), stop_token_ids=list(req.stop_token_ids or []),
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", _alias(req, "repetition_penalty", "repeat_penalty")),
            logit_bias=self._logit_bias(req.logit_bias), min_tokens=req.min_tokens or 0,
            grammar=grammar_spec(req))
        try:
            params.validate()
        except ValueError as exc:
            raise OpenAIError(str(exc), param=str(exc).split(" ", 1)[0]) from None
        return params
