"""Tool-call and reasoning parsers on hand-written model outputs of each family: the whole parse,
and streamed deltas (one character at a time and in odd pieces) that add up to it."""

from __future__ import annotations

import json

import pytest
from minisgl_jax.server.reasoning import REASONING_FORMATS, ReasoningParser
from minisgl_jax.server.tool_parsers import FORMATS, ToolCallParser, tool_parser_name

OUTPUTS = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
         None, [("get_weather", {"city": "Paris", "unit": "c"})]),
        ('Let me check.\n\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
         '{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>',
         "Let me check.", [("a", {}), ("b", {"x": [1, {"y": "}"}]})]),
        ("Paris is sunny today.", "Paris is sunny today.", []),
        ('<tool_call>\n{"name": "f", "arguments": {"q": "caf\u00e9 \\"quoted\\" <tool_call>"}}\n</tool_call>',
         None, [("f", {"q": 'caf\u00e9 "quoted" <tool_call>'})]),
        ('<tool_call>\n{"nam', '<tool_call>\n{"nam', []),  # cut off before any call: text after all
        ('<tool_call>\n{"name": "f", "arguments": {"q": "cu', None, [("f", '{"q": "cu')]),  # cut off in a call
        ('I use <tool_call> wrongly {', 'I use <tool_call> wrongly {', []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
        ('<|python_tag|>{"name": "a", "parameters": {"n": 1.5}}; {"name": "b", "parameters": {"n": -2}}',
         None, [("a", {"n": 1.5}), ("b", {"n": -2})]),
        ("The weather is {probably} fine.", "The weather is {probably} fine.", []),
        ('{"name": "noargs"}', None, [("noargs", {})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "search", "arguments": {"query": "llamas"}}]', None, [("search", {"query": "llamas"})]),
        ('Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"k": true}}, {"name": "b", "arguments": {"k": null}}]',
         "Sure.", [("a", {"k": True}), ("b", {"k": None})]),
        ("No tools needed.", "No tools needed.", []),
        ('[{"name": "a", "arguments": {}}]', None, [("a", {})]),  # [TOOL_CALLS] left out as a special token
        ("[1] is a footnote.", "[1] is a footnote.", []),
    ],
}
CASES = [(family, *case) for family, cases in OUTPUTS.items() for case in cases]


def parse_whole(family: str, text: str):
    parser = ToolCallParser(FORMATS[family])
    parser.feed(text)
    parser.finish()
    return (parser.content or None), parser.calls


def parse_streamed(family: str, pieces: list[str]):
    parser = ToolCallParser(FORMATS[family])
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    content = "".join(d["content"] for d in deltas if "content" in d) or None
    calls: dict[int, dict] = {}
    for d in deltas:
        if "tool_call" in d:
            item = d["tool_call"]
            call = calls.setdefault(item["index"], {"id": None, "name": None, "arguments": ""})
            assert call["name"] is None or "name" not in item["function"], "a name announced twice"
            call["id"] = item.get("id", call["id"])
            call["name"] = item["function"].get("name", call["name"])
            call["arguments"] += item["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("family, text, content, expected", CASES)
def test_a_whole_output_parses_into_content_and_calls(family, text, content, expected):
    got_content, calls = parse_whole(family, text)
    assert got_content == content
    assert [(c.name, c.arguments if isinstance(args, str) else json.loads(c.arguments))
            for c, (_, args) in zip(calls, expected, strict=True)] == expected
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("family, text, content, expected", CASES)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_deltas_add_up_to_the_whole_parse(family, text, content, expected, step):
    whole_content, whole_calls = parse_whole(family, text)
    streamed_content, streamed_calls = parse_streamed(family, [text[i:i + step] for i in range(0, len(text), step)])
    assert streamed_content == whole_content
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == \
           [(c.name, c.arguments) for c in whole_calls]


def test_the_name_streams_before_any_argument_fragment():
    parser = ToolCallParser(FORMATS["hermes"])
    deltas = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert deltas[0]["tool_call"]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[1]["tool_call"] == {"index": 0, "function": {"arguments": '{"city": "Pa'}}
    assert parser.feed('ris"}}\n</tool_call>') == [{"tool_call": {"index": 0, "function": {"arguments": 'ris"}'}}}]


def test_the_parser_comes_from_the_flag_or_the_model_type():
    assert tool_parser_name(None, "qwen3") == "hermes" and tool_parser_name(None, "llama") == "llama3_json"
    assert tool_parser_name("mistral", "qwen3") == "mistral" and tool_parser_name(None, "gpt2") is None
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        tool_parser_name("nope", None)


REASONING = [
    ("qwen3", "<think>\nThe user wants 2+2.\n</think>\n\nIt is 4.", "\nThe user wants 2+2.\n", "It is 4."),
    ("qwen3", "It is 4.", "", "It is 4."),
    ("qwen3", "<think>still thinking when cut off", "still thinking when cut off", ""),
    ("qwen3", "<thin", "", "<thin"),
    ("deepseek_r1", "Hmm, 2+2.</think>4", "Hmm, 2+2.", "4"),
]


@pytest.mark.parametrize("name, text, reasoning, answer", REASONING)
@pytest.mark.parametrize("step", [1, 2, 100])
def test_reasoning_is_split_from_the_answer_whole_and_streamed(name, text, reasoning, answer, step):
    parser = ReasoningParser(REASONING_FORMATS[name])
    pieces = [parser.feed(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    assert "".join(r for r, _ in pieces) == reasoning == parser.reasoning
    assert "".join(a for _, a in pieces) == answer == parser.answer
