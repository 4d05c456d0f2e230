"""Unit tests: protocol models, settings precedence and --help, metric names, no torch in server/."""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.config import EngineConfig
from engine.messages import RequestStats
from server import protocol as P
from server.metrics import ServerMetrics
from server.settings import Settings, build_parser, load_settings

REPO = Path(__file__).resolve().parents[1]


# ---- protocol --------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["hi", [1, 2, 3], ["hi"], [[1, 2]]])
def test_completion_prompt_forms(prompt):
    assert P.CompletionRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("bad", [
    {"prompt": 5}, {"prompt": [1.5]}, {"prompt": ["a", 1]}, {},
    {"prompt": "x", "temperature": math.nan}, {"prompt": "x", "top_p": math.inf},
    {"prompt": "x", "temperature": "hot"}, {"prompt": "x", "max_tokens": 2.5}, {"prompt": "x", "stop": 3},
    {"prompt": "x", "stream": "maybe"}, {"prompt": "x", "logprobs": "many"},
])
def test_completion_rejects_bad_fields(bad):
    with pytest.raises(ValidationError):
        P.CompletionRequest(**bad)


def test_unknown_fields_are_refused_ignored_fields_dropped_and_defaults():
    with pytest.raises(ValidationError, match="some_client_extra"):
        P.CompletionRequest(prompt="x", some_client_extra={"a": 1})
    r = P.CompletionRequest(prompt="x", user="u", metadata={"a": "b"})
    assert "user" not in r.model_fields_set and not hasattr(r, "metadata")
    assert r.max_tokens == 16 and r.n == 1 and r.stop_list() == [] and not r.stream
    assert P.CompletionRequest(prompt="x", stop="a").stop_list() == ["a"]
    c = P.ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert c.messages[0].content[0].text == "hi" and c.max_tokens is None and c.logprobs is False


def test_chat_rejects_bad_messages():
    for bad in ({"messages": "hi"}, {"messages": [{"content": "no role"}]}, {"messages": [{"role": "user", "content": 5}]}):
        with pytest.raises(ValidationError):
            P.ChatCompletionRequest(**bad)


def test_error_shape():
    e = P.ErrorResponse(error=P.ErrorInfo(message="m", type="t")).model_dump()
    assert e == {"error": {"message": "m", "type": "t", "param": None, "code": None}}


# ---- settings ------------------------------------------------------------------------------

def test_settings_precedence_cli_env_yaml_default(tmp_path, monkeypatch):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_queue_size: 3\nport: 9000\nqueue_timeout_s: 5\nmode: sync\n")
    monkeypatch.setenv("AMUSD_PORT", "9100")
    monkeypatch.setenv("AMUSD_QUEUE_TIMEOUT_S", "7")
    monkeypatch.setenv("AMUSD_API_KEYS", "a, b")
    s = load_settings(["--config", str(cfg), "--queue-timeout-s", "9", "--no-access-log"])
    assert s.max_queue_size == 3            # YAML over default
    assert s.port == 9100                   # env over YAML
    assert s.queue_timeout_s == 9           # CLI over env
    assert s.mode == "sync" and s.access_log is False and s.api_keys == ["a", "b"]
    assert s.host == "127.0.0.1"            # default
    assert "'a'" not in repr(s) and "'a'" not in str(s.public_dict())   # keys never printed


def test_settings_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_queue_sise: 3\n")
    with pytest.raises(ValidationError):
        load_settings(["--config", str(bad)])
    with pytest.raises(ValidationError):
        load_settings(["--port", "70000"])
    with pytest.raises(SystemExit):
        load_settings(["--max-queue-size", "many"])


def test_every_engine_setting_is_a_server_setting_with_the_same_default():
    for f in dataclasses.fields(EngineConfig):
        if f.name in ("verify_model", "draft_model"):
            continue
        assert f.name in Settings.model_fields, f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert Settings.model_fields[f.name].get_default(call_default_factory=True) == default, f.name
    cfg = Settings(model="tiny-random/verify", draft_model="tiny-random/draft", max_draft_lead=5).to_engine_config()
    assert cfg.max_draft_lead == 5 and cfg.verify_model == "tiny-random/verify"
    assert Settings(mode="ar").to_engine_config().draft_model is None


def test_help_lists_every_setting_with_default():
    text = build_parser().format_help()
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in text, name
    assert text.count("(default:") >= len(Settings.model_fields)
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--max-queue-size" in out.stdout and "(default: 16)" in out.stdout


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_configs_are_valid(name):
    s = load_settings(["--config", str(REPO / "configs" / name)])
    s.to_engine_config()
    if name == "default.yaml":
        assert (s.model, s.draft_model, s.mode, s.dtype) == ("default", "default", "auto", "auto")
        assert (s.verify_quantization, s.draft_quantization, s.num_speculative_tokens) == ("auto", "auto", 0)
        assert (s.verify_cores, s.draft_cores) == ("0", "1")
    else:
        assert s.model.startswith("tiny-random/") and s.dtype in ("float32", "float64")


# ---- metrics -------------------------------------------------------------------------------

def test_metric_names_match_the_deploy_list():
    """Every metric in docker/prometheus/exported-metrics.txt is exported, with its labels."""
    health = lambda: {"workers": {r: {"is_alive": True, "num_restarts": 1, "heartbeat_age_s": 0.1,
                                      "forward_costs_s": [0.01, 0.012]}
                                  for r in ("verify", "draft")},
                      "kv_cache": {"budget_tokens": 1000, "reserved_tokens": 250}}
    m = ServerMetrics(health=health)
    m.record_finished("stop", 1.0, RequestStats(num_prompt_tokens=3, num_generated_tokens=5, num_verify_steps=2,
                                                num_draft_tokens=4, sum_draft_lead=6, num_draft_tokens_per_pos=[2, 2],
                                                num_accepted_tokens_per_pos=[2, 1], num_passes_by_batch_size=[1, 0, 3]))
    text = m.render().decode()
    assert "amusd:kv_cache_usage_perc 0.25" in text and "amusd:kv_cache_budget_tokens 1000.0" in text
    assert 'amusd:batch_size_bucket{le="2.0"} 1.0' in text and 'amusd:batch_size_bucket{le="3.0"} 4.0' in text
    assert 'amusd:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 1.0' in text
    listed = REPO / "docker" / "prometheus" / "exported-metrics.txt"
    if not listed.exists():
        pytest.skip("no exported-metrics list")
    for line in listed.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kind, name, *labels = line.split()
        assert re.search(rf"^# TYPE {re.escape(name.removesuffix('_total'))}(_total)? {kind}$", text, re.M), name
        sample = name + ("_bucket" if kind == "histogram" else "")
        rows = [ln for ln in text.splitlines() if ln.startswith(sample + "{") or ln.startswith(sample + " ")]
        assert rows, name
        for label in labels:
            assert any(re.search(rf'[{{,]{label}="', r) for r in rows), (name, label)
    assert 'amusd:worker_restarts_total{worker="draft"} 1.0' in text
    assert "amusd:spec_decode_draft_lead_tokens_sum 3.0" in text


def test_two_apps_have_independent_registries():
    a, b = ServerMetrics(), ServerMetrics()
    a.record_failure("queue_full")
    assert 'reason="queue_full"} 1.0' in a.render().decode()
    assert 'reason="queue_full"} 0.0' in b.render().decode()


def test_server_never_imports_torch(byte_tokenizer_dir):
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import server.main, server.app, server.serving, engine.supervisor;"
        "from server.app import create_app, load_tokenizer; from server.settings import Settings;"
        f"t = load_tokenizer({byte_tokenizer_dir!r});"
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False);"
        "create_app(Settings());"
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_request_stats_of_several_choices_add_up_per_position():
    a = RequestStats(num_draft_tokens=5, num_draft_tokens_per_pos=[3, 2], num_accepted_tokens_per_pos=[2, 1])
    b = RequestStats(num_draft_tokens=6, num_draft_tokens_per_pos=[2, 2, 2], num_accepted_tokens_per_pos=[2])
    total = a.plus(b)
    assert total.num_draft_tokens == 11
    assert total.num_draft_tokens_per_pos == [5, 4, 2] and total.num_accepted_tokens_per_pos == [4, 1]
