"""A request's structured-output fields to its one grammar: tool_choice "required" or a named function
always yields calls that parse and validate (driven by random allowed tokens, as a random-weight
model drives them), and each bad field is an error naming it."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from minisgl_jax.server.chat_output import ChatOutputParser, ChatParsing
from minisgl_jax.server.reasoning import REASONING_FORMATS
from minisgl_jax.server.structured import after_reasoning, grammar_fields, tool_call_grammar
from minisgl_jax.server.tool_parsers import FORMATS, ToolCallParser
from tiny_tokenizers import tiny_bpe_tokenizer

from minisgl_jax.grammar import GrammarCompiler, GrammarSpec, GrammarVocab

VOCAB = 416
EOS = 1
FUNCTIONS = [
    {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "add", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "y": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
        "required": ["x", "y"], "additionalProperties": False}},
    {"name": "ping"},  # no parameters: any object
]


@pytest.fixture(scope="module")
def compiler():
    tokenizer = tiny_bpe_tokenizer()
    compiler = GrammarCompiler(GrammarVocab(tokenizer, VOCAB))
    yield compiler
    compiler.close()


def random_output(compiler: GrammarCompiler, grammar: str, seed: int) -> str:
    matcher = compiler.compile(GrammarSpec("lark", grammar)).matcher([EOS])
    rng = np.random.default_rng(seed)
    mask = np.zeros(compiler.vocab.mask_words, np.int32)
    tokens: list[int] = []
    for _ in range(4000):
        matcher.fill_mask(mask)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:VOCAB])
        token = int(rng.choice(allowed))
        assert matcher.accept(token), matcher.error
        if matcher.is_finished:
            return compiler.vocab.tokenizer.decode([t for t in tokens + [token] if t != EOS])
        tokens.append(token)
    raise AssertionError("the tool calls did not end")


@pytest.mark.parametrize("family", sorted(FORMATS))
@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_always_parse_and_validate(compiler, family, parallel):
    grammar = tool_call_grammar(FORMATS[family], FUNCTIONS, parallel)
    schemas = {f["name"]: f.get("parameters", {"type": "object"}) for f in FUNCTIONS}
    for seed in range(4):
        text = random_output(compiler, grammar, seed)
        parser = ToolCallParser(FORMATS[family], constrained=True)
        parser.feed(text)
        parser.finish()
        assert parser.content == "" and parser.calls, text
        assert parallel or len(parser.calls) == 1
        for call in parser.calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_a_named_function_is_the_only_one_called(compiler):
    grammar = tool_call_grammar(FORMATS["hermes"], [FUNCTIONS[1]], parallel=False)
    for seed in range(3):
        parser = ToolCallParser(FORMATS["hermes"], constrained=True)
        parser.feed(random_output(compiler, grammar, seed))
        assert [c.name for c in parser.calls] == ["add"]


def test_tool_parameters_that_are_no_schema_are_an_error_naming_the_tool():
    bad = [FUNCTIONS[0], {"name": "broken", "parameters": {"type": "nonsense"}}]
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.parameters is invalid"):
        tool_call_grammar(FORMATS["hermes"], bad, parallel=True)


def test_each_grammar_field_maps_to_its_sampling_params_field():
    assert grammar_fields(None, None, None, None) == {}
    assert grammar_fields({"type": "text"}, None, None, None) == {}
    assert grammar_fields({"type": "json_object"}, None, None, None) == {"json_schema": '{"type": "object"}'}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert grammar_fields({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, None, None, None) \
        == {"json_schema": json.dumps(schema)}
    assert grammar_fields(None, "[0-9]+", None, None) == {"regex": "[0-9]+"}
    assert grammar_fields(None, None, 'root ::= "a"', None) == {"ebnf": 'root ::= "a"'}
    assert grammar_fields(None, None, None, schema) == {"json_schema": json.dumps(schema)}


@pytest.mark.parametrize("args, message", [
    (({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bad"}}}, None, None, None),
     r"^response_format\.json_schema\.schema is invalid"),
    (({"type": "json_schema"}, None, None, None), r"^response_format\.json_schema is required"),
    ((None, "(", None, None), r"^regex is invalid"),
    ((None, None, "root ::= nothing", None), r"^ebnf is not a valid GBNF grammar"),
    ((None, None, None, "{not json"), r"^json_schema is not valid JSON"),
    (({"type": "json_object"}, "a", None, None), r"^regex cannot be combined with response_format"),
])
def test_each_bad_grammar_field_is_named(args, message):
    with pytest.raises(ValueError, match=message):
        grammar_fields(*args)
    with pytest.raises(ValueError, match=message.replace("^", "^sampling_params\\.") if args[0] is None else message):
        grammar_fields(*args, prefix="sampling_params." if args[0] is None else "")


@pytest.mark.parametrize("reasoning", ["qwen3", "deepseek_r1"])
def test_the_grammar_applies_after_the_reasoning_section(compiler, reasoning):
    """Free thinking, then the schema, the regex or the tool calls: the reasoning parser splits them."""
    fmt = REASONING_FORMATS[reasoning]
    schema = FUNCTIONS[1]["parameters"]
    cases = [({"json_schema": json.dumps(schema)}, None), ({"regex": "(yes|no)!"}, None),
             ({"lark": tool_call_grammar(FORMATS["hermes"], FUNCTIONS[:1], parallel=False)}, FORMATS["hermes"])]
    for grammar, tool_format in cases:
        (kind, wrapped), = after_reasoning(grammar, fmt).items()
        assert kind == "lark"
        for seed in range(2):
            parser = ChatOutputParser(ChatParsing(tool_format, tool_format is not None, fmt))
            parser.feed(random_output(compiler, wrapped, seed), finished=True)
            message = parser.message()
            if "json_schema" in grammar:
                jsonschema.validate(json.loads(message["content"]), schema)
            elif "regex" in grammar:
                assert message["content"] in ("yes!", "no!")
            else:
                (call,) = message["tool_calls"]
                jsonschema.validate(json.loads(call["function"]["arguments"]), FUNCTIONS[0]["parameters"])
