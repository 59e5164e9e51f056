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


def test_tokens_after_the_one_completing_a_stop_string_are_left_out(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    whole = IncrementalDetokenizer(tokenizer, [1, 2, 3], stop=["END"])
    text, used = whole.add_until_stop(ids)
    assert text == "héllo 世界 😀 the " and whole.stopped
    assert "END" in tokenizer.decode(ids[:used]) and "END" not in tokenizer.decode(ids[: used - 1])
    plain = IncrementalDetokenizer(tokenizer, [1, 2, 3])
    assert plain.add_until_stop(ids)[1] == len(ids)  # no stop strings: every token is used


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode("ab", add_special_tokens=False) + [tokenizer.eos_token_id]
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "ab"


def test_fallback_tokenizer_gives_every_model_id_visible_text():
    tokenizer = byte_level_tokenizer(vocab_size=1000)
    words = [tokenizer.decode([i]) for i in range(259, 1000)]
    assert len(tokenizer) == 1000 and all(w.startswith(" ") and len(w) > 1 for w in words)
    assert len(set(words)) == len(words)
    assert tokenizer.encode("<|im_end|>") == [257]  # the specials keep their ids


def test_an_incomplete_character_at_the_end_comes_out_as_a_replacement_character():
    tokenizer = byte_level_tokenizer()
    detok = IncrementalDetokenizer(tokenizer, [104])
    assert detok.add([0xE5]) == "" and detok.add([0xE5]) == ""  # never a complete character
    assert detok.flush() == tokenizer.decode([0xE5, 0xE5]) and "\ufffd" in detok.text
