"""Server settings: one flat pydantic-settings model fed by CLI flags, env vars and a YAML file.

Precedence (highest first): CLI flag (`--max-queue-size 4`) > env var (`AMUSD_MAX_QUEUE_SIZE=4`)
> YAML file (`--config configs/tiny.yaml`, or `AMUSD_CONFIG`) > the defaults below.
`amusd serve --help` lists every setting with its default; flags are the field names with dashes.

Engine settings are made from `engine.config.EngineConfig`'s fields (type, default, help, bounds:
declared once there); `to_engine_config()` builds one.
`model: default` / `draft_model: default` mean the default pair fetched by `amusd fetch-models`.
"""
from __future__ import annotations

import argparse
import contextvars
import dataclasses
import json
import os
import types
import typing
from typing import Annotated, Any

import pydantic
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, YamlConfigSettingsSource

from engine.config import EngineConfig

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
DEFAULT_MODEL = "default"   # the fetched default pair (engine.fetch.ensure_default_models)
_yaml_file: contextvars.ContextVar[str | None] = contextvars.ContextVar("amusd_yaml_file", default=None)


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AMUSD_", extra="forbid", validate_default=True,
                                      protected_namespaces=())

    # ---- HTTP server -------------------------------------------------------------
    host: str = Field("127.0.0.1", description="interface to bind (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    served_model_name: str | None = Field(None, description="model id clients send and /v1/models lists "
                                          "(none = the verify model's name)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False,
        description="accepted API keys for /v1/*, /tokenize and /detokenize (comma-separated or JSON list; "
                    "empty = no auth)")
    metrics_require_auth: bool = Field(False, description="require an API key on /metrics too")
    metrics_names: str = Field("amusd", description="metric names on /metrics: amusd (amusd:*) | vllm "
                               "(vLLM's vllm:* names with a model_name label, for vLLM dashboards)")
    log_level: str = Field("info", description="log level: debug, info, warning, error")
    access_log: bool = Field(True, description="log one line per HTTP request")
    shutdown_grace_s: float = Field(20.0, gt=0, description="on SIGTERM, seconds in-flight requests "
                                    "may take to finish before they are cancelled")
    # ---- limits ------------------------------------------------------------------
    queue_timeout_s: float = Field(60.0, gt=0, description="a request waiting longer than this gets 503")
    max_request_body_bytes: int = Field(1_048_576, ge=1024, description="larger request bodies get 413")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted (also bounded by "
                                   "max_model_len)")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    max_stop_strings: int = Field(8, ge=0, description="most stop strings per request")
    max_choices: int = Field(16, ge=1, description="most choices per request (n x prompts), run one after another")
    default_temperature: float = Field(1.0, ge=0, description="temperature when a request sets none "
                                       "and generation_config gives none (OpenAI's default is 1.0; 0 = greedy)")
    generation_config: str = Field("auto", description="sampling defaults (temperature, top_p, top_k, min_p, "
                                   "repetition_penalty) for fields a request leaves unset: auto (the model's "
                                   "generation_config.json, as vLLM) | none | a directory holding one")
    # ---- tools / chat templates (issue 12) -------------------------------------------
    tool_call_parser: str = Field("hermes", description="how tool calls are parsed from the output: "
                                  "hermes (Qwen2.5, Hermes: <tool_call>{json}</tool_call>)")
    trust_request_chat_template: bool = Field(False, description="accept a request's own Jinja "
                                              "chat_template (runs client-supplied template code)")
    # ---- models (engine/config.py's verify_model / draft_model; 'default' = the fetched pair) --------
    model: str = Field(DEFAULT_MODEL, description=_ENGINE_FIELDS["verify_model"].metadata["help"])
    draft_model: str | None = Field(DEFAULT_MODEL, description=_ENGINE_FIELDS["draft_model"].metadata["help"])
    # ---- every other engine setting: added from EngineConfig's fields below (_with_engine_settings) ----

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, v: str) -> str:
        from server.tool_parsers import get_tool_parser
        get_tool_parser(v)            # ValueError naming the known parsers
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [k.strip() for k in v.split(",") if k.strip()]
        return v if v is not None else []

    @field_validator("metrics_names")
    @classmethod
    def _metrics_names(cls, v: str) -> str:
        if v not in ("amusd", "vllm"):
            raise ValueError("metrics_names must be amusd or vllm")
        return v

    @field_validator("generation_config")
    @classmethod
    def _generation_config(cls, v: str) -> str:
        if v not in ("auto", "none") and not os.path.isdir(v):
            raise ValueError("generation_config must be auto, none or an existing directory")
        return v

    @field_validator("draft_model", "verify_cores", "draft_cores", "prefill_cores", "gguf_file", "draft_gguf_file",
                     "served_model_name", mode="before", check_fields=False)
    @classmethod
    def _none_words(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in ("", "none", "null") else v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        sources = [init_settings, env_settings]
        path = _yaml_file.get()
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def to_engine_config(self, verify_model: str | None = None, draft_model: str | None = None) -> EngineConfig:
        """EngineConfig from these settings; pass resolved model dirs for 'default'. Raises ConfigError."""
        kwargs = {name: getattr(self, name) for name in _ENGINE_FIELDS if name not in ("verify_model", "draft_model")}
        draft = draft_model if draft_model is not None else self.draft_model
        if self.mode == "ar":
            draft = None
        return EngineConfig(verify_model=verify_model or self.model, draft_model=draft, **kwargs)

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log (API keys redacted)."""
        d = self.model_dump()
        d["api_keys"] = f"<{len(self.api_keys)} keys>"
        return d


def _with_engine_settings(base: type[BaseSettings]) -> type[BaseSettings]:
    """`base` plus a field per EngineConfig setting (its type, default, help and bounds), so that
    each engine setting is declared once, in engine/config.py."""
    hints = typing.get_type_hints(EngineConfig)
    fields = {}
    for name, f in _ENGINE_FIELDS.items():
        if name in base.model_fields or name == "verify_model":
            continue
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        fields[name] = (hints[name], Field(**default, description=f.metadata["help"], **f.metadata["bounds"]))
    return pydantic.create_model("Settings", __base__=base, __module__=__name__, **fields)


Settings = _with_engine_settings(_Settings)


def _arg_type(annotation: Any) -> tuple[Any, bool]:
    """(argparse type, is_optional) for a field annotation."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, optional


def build_parser(prog: str = "amusd serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.HelpFormatter,
        description="OpenAI-compatible AMUSD server. Every flag can also be set as an env var "
                    "AMUSD_<NAME> or in the YAML file; precedence: flag > env > YAML > default.")
    parser.add_argument("--config", default=os.environ.get("AMUSD_CONFIG"),
                        help="YAML settings file (keys = setting names), also AMUSD_CONFIG")
    for name, field in Settings.model_fields.items():
        typ, _optional = _arg_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "(none)" if default in (None, []) else default
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{field.description} (default: {shown})"}
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(typ) is list:
            parser.add_argument(flag, type=str, metavar="A,B", **kwargs)
        else:
            parser.add_argument(flag, type=typ if typ in (int, float) else str, **kwargs)
    return parser


def load_settings(argv: list[str] | None = None, **overrides: Any) -> Settings:
    """Parse CLI flags, then build Settings (CLI > env > YAML > defaults).

    Raises SystemExit for --help / bad flags, FileNotFoundError for a missing config file and
    pydantic.ValidationError for bad values.
    """
    ns = vars(build_parser().parse_args([] if argv is None else argv))
    path = ns.pop("config", None)
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    token = _yaml_file.set(path)
    try:
        return Settings(**{**ns, **overrides})
    finally:
        _yaml_file.reset(token)
