"""Incremental detokenization equals a one-shot decode, never splits a character, honours stops."""

import pytest

from minisgl_jax.detokenizer import IncrementalDetokenizer
from minisgl_jax.tokenizer import byte_level_tokenizer

TEXT = "héllo 世界 😀 the END of it"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def stream(tokenizer, ids, stop=None):
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], stop=stop)
    deltas = [detok.add([i]) for i in ids]
    return deltas + [detok.flush()], detok


def test_deltas_concatenate_to_full_decode_without_broken_characters(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids)
    assert "".join(deltas) == TEXT == detok.text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop,expected", [("END", "héllo 世界 😀 the "), ("界 😀", "héllo 世"), ("zzz", TEXT)])
def test_stop_strings_across_token_boundaries(tokenizer, stop, expected):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids, stop=[stop])
    assert "".join(deltas) == expected
    assert detok.stopped == (stop in TEXT)


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode("ab", add_special_tokens=False) + [tokenizer.eos_token_id]
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "ab"
