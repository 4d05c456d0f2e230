"""Shared fixtures: a byte-level tokenizer dir (session), more server fixtures below."""
from __future__ import annotations

import pytest

from tests.fakes import build_byte_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> str:
    return build_byte_tokenizer(str(tmp_path_factory.mktemp("byte_tokenizer")))
