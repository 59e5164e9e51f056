"""Grammar compilation: bad grammars are errors naming the field, pathological ones hit the time and
size limits without blocking the caller, and the cache stays within its entries and bytes."""

from __future__ import annotations

import json
import time

import pytest

from minisgl_jax.core import SamplingParams
from minisgl_jax.grammar import CompilerConfig, GrammarCompiler, GrammarSpec, GrammarVocab, check_grammar, grammar_spec
from minisgl_jax.tokenizer import byte_level_tokenizer

SLOW_REGEX = "a{1000}{1000}"  # building its lexer takes llguidance most of a second


@pytest.fixture(scope="module")
def vocab() -> GrammarVocab:
    return GrammarVocab(byte_level_tokenizer(300), 320)


def compiler_with(vocab: GrammarVocab, **config) -> GrammarCompiler:
    return GrammarCompiler(vocab, CompilerConfig(**config))


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec("json_schema", '{"type": "foo"}'), "json_schema is invalid: .*foo"),
    (GrammarSpec("json_schema", '{"type": "object",'), "json_schema is not valid JSON"),
    (GrammarSpec("json_schema", '[1, 2]'), "json_schema must be a JSON Schema"),
    (GrammarSpec("json_schema", '{"type": "array", "uniqueItems": true}'), "json_schema is invalid: .*uniqueItems"),
    (GrammarSpec("json_schema", '{"$ref": "#/$defs/missing"}', field="response_format"), "response_format is invalid"),
    (GrammarSpec("regex", "a(b"), "regex is invalid: .*unclosed group"),
    (GrammarSpec("ebnf", 'root ::= "a'), "ebnf is not a valid GBNF grammar"),
    (GrammarSpec("ebnf", 'root ::= missing'), "ebnf is not a valid GBNF grammar: .*'missing' not found"),
    (GrammarSpec("lark", "start: nothing_here"), "lark is invalid: .*nothing_here"),
])
def test_an_invalid_grammar_is_an_error_naming_its_field(vocab, spec, message):
    with pytest.raises(ValueError, match=message):
        check_grammar(spec)
    compiler = compiler_with(vocab)
    with pytest.raises(ValueError, match=message):
        compiler.compile(spec)
    compiler.close()


def test_a_catastrophic_regex_hits_the_time_limit_and_submit_never_blocks(vocab):
    compiler = compiler_with(vocab, timeout_s=0.05)
    started = time.monotonic()
    handle = compiler.submit(GrammarSpec("regex", SLOW_REGEX))
    quick = compiler.submit(GrammarSpec("regex", "[0-9]+"))
    assert time.monotonic() - started < 0.05 and not handle.done()
    with pytest.raises(RuntimeError, match="poll done"):
        handle.result()
    quick.wait()  # the other worker compiles it meanwhile
    with pytest.raises(ValueError, match="regex took longer than the grammar compile time limit of 0.05 s"):
        handle.wait()
    assert time.monotonic() - started < 0.5  # reported at the limit, not when llguidance gives up
    compiler.close()


def test_a_grammar_over_the_size_limits_is_refused(vocab):
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 9} for i in range(30_000)}}
    spec = GrammarSpec("json_schema", json.dumps(huge))
    with pytest.raises(ValueError, match=r"json_schema is too large: \d+ bytes, the limit is 65536"):
        compiler_with(vocab, max_source_bytes=65536).compile(spec)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 9} for i in range(300)}}
    with pytest.raises(ValueError, match="json_schema is invalid: grammar size .* too big"):  # symbols after expansion
        compiler_with(vocab, max_grammar_symbols=1000).compile(GrammarSpec("json_schema", json.dumps(wide)))


def test_the_cache_is_bounded_in_entries_and_bytes(vocab):
    compiler = compiler_with(vocab, cache_entries=3)
    for n in range(6):
        compiler.compile(GrammarSpec("regex", f"x{{{n + 1}}}"))
        assert compiler.cache_size[0] <= 3
    assert compiler.cache_size[0] == 3
    one_entry = compiler.cache_size[1] / 3
    small = compiler_with(vocab, cache_bytes=int(one_entry * 2.5))
    for n in range(6):
        small.compile(GrammarSpec("regex", f"y{{{n + 1}}}"))
        assert small.cache_size[1] <= int(one_entry * 2.5)
    assert small.cache_size[0] == 2


def test_a_cached_grammar_is_done_at_once_and_the_same(vocab):
    compiler = compiler_with(vocab)
    spec = GrammarSpec("json_schema", '{"type": "integer"}')
    first = compiler.compile(spec)
    again = compiler.submit(GrammarSpec("json_schema", '{"type": "integer"}'))
    assert again.done() and again.result() is first


def test_the_same_grammar_submitted_while_compiling_shares_the_compilation(vocab):
    compiler = compiler_with(vocab, workers=1)
    blocker = compiler.submit(GrammarSpec("regex", "b{500}{500}"))
    one, two = compiler.submit(GrammarSpec("regex", "z+")), compiler.submit(GrammarSpec("regex", "z+"))
    blocker.wait()
    assert one.wait() is two.wait()


def test_sampling_params_take_at_most_one_grammar():
    assert grammar_spec(SamplingParams()) is None and not SamplingParams().constrained
    params = SamplingParams(regex="[a-z]+")
    params.validate()
    assert params.constrained and grammar_spec(params) == GrammarSpec("regex", "[a-z]+")
    with pytest.raises(ValueError, match=r"^regex cannot be combined with json_schema"):
        SamplingParams(json_schema="{}", regex="a").validate()
    with pytest.raises(ValueError, match="^ebnf must be a non-empty string"):
        SamplingParams(ebnf="").validate()
