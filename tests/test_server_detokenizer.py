"""Unit tests for server/detokenizer.py with a byte-level tokenizer (1 token = 1 UTF-8 byte)."""
from __future__ import annotations

import random

import pytest

from server.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(byte_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(byte_tokenizer_dir)


def ids_of(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def run(tok, text, stop=(), chunk=1, prompt="Q: "):
    d = IncrementalDetokenizer(tok, ids_of(prompt), stop=stop)
    ids, pieces = ids_of(text), []
    used_total = 0
    for i in range(0, len(ids), chunk):
        piece, used = d.add(ids[i:i + chunk])
        used_total += used
        pieces.append(piece)
        if d.stopped:
            break
    if not d.stopped:
        pieces.append(d.flush())
    return pieces, d, used_total


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_multibyte_never_split(tok, chunk):
    text = "héllo 世界 🎉 naïve ∑x — ok"
    pieces, d, _ = run(tok, text, chunk=chunk)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert d.num_tokens == len(ids_of(text))


def test_each_piece_is_whole_chars_byte_by_byte(tok):
    text = "🎉🎉世"
    pieces, _, _ = run(tok, text, chunk=1)
    assert [p for p in pieces if p] == ["🎉", "🎉", "世"]


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_stop_string_split_across_tokens_never_leaks(tok, chunk):
    text = "one two STOP three"
    pieces, d, used = run(tok, text, stop=["STOP"], chunk=chunk)
    streamed = "".join(pieces)
    assert streamed == "one two "
    assert d.stopped and d.stop_reason == "STOP"
    assert "S" not in streamed
    # tokens consumed stop at the one completing the stop string
    assert used == len(ids_of("one two STOP"))


def test_partial_stop_prefix_is_released_when_not_a_stop(tok):
    text = "a STAR is born"
    pieces, d, _ = run(tok, text, stop=["STOP"], chunk=1)
    assert "".join(pieces) == text and not d.stopped
    # "ST" was held back at some point, never emitted before it was known not to be a stop
    acc = ""
    for p in pieces:
        acc += p
        assert text.startswith(acc)


def test_held_back_prefix_flushed_at_end(tok):
    pieces, d, _ = run(tok, "ends with ST", stop=["STOP"])
    assert "".join(pieces) == "ends with ST" and not d.stopped
    assert pieces[-1].endswith("ST")      # released only by flush()


def test_multibyte_stop_string(tok):
    text = "abc世界def"
    pieces, d, _ = run(tok, text, stop=["界d"], chunk=1)
    assert "".join(pieces) == "abc世" and d.stop_reason == "界d"


def test_earliest_of_several_stops(tok):
    pieces, d, _ = run(tok, "xx END yy STOP", stop=["STOP", "END"], chunk=3)
    assert "".join(pieces) == "xx " and d.stop_reason == "END"


def test_stop_at_start(tok):
    pieces, d, _ = run(tok, "\n\nrest", stop=["\n\n"])
    assert "".join(pieces) == "" and d.stopped


def test_incomplete_tail_flushed_on_length(tok):
    ids = ids_of("ok世")[:-1]            # generation ended mid-character
    d = IncrementalDetokenizer(tok, [], stop=[])
    text, _ = d.add(ids)
    assert text == "ok"
    assert d.flush() == "\ufffd"         # like vLLM: the broken char becomes U+FFFD at the end


def test_special_tokens_skipped(tok):
    d = IncrementalDetokenizer(tok, [], stop=[])
    text, used = d.add(ids_of("hi") + [tok.convert_tokens_to_ids("<|im_end|>")])
    assert text + d.flush() == "hi" and used == 3


def test_random_chunking_property(tok):
    rng = random.Random(0)
    alphabet = "ab S T O P 世界🎉é\n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["STOP"] if rng.random() < 0.7 else ["界🎉", "\n\n"]
        ids = ids_of(text)
        d = IncrementalDetokenizer(tok, [], stop=stops)
        out, i = "", 0
        while i < len(ids) and not d.stopped:
            n = rng.randint(1, 4)
            piece, _ = d.add(ids[i:i + n])
            assert "\ufffd" not in piece
            out += piece
            i += n
        if not d.stopped:
            out += d.flush()
        cut = min([j for s in stops if (j := text.find(s)) >= 0], default=len(text))
        assert out == text[:cut], (text, stops, out)
