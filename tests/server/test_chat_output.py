"""Chat responses of a reasoning model that calls tools: streamed events add up to the whole message,
reasoning stays out of content and out of tool parsing; and the bundled templates with tools."""

from __future__ import annotations

import json

import pytest
from minisgl_jax.server.chat_output import ChatParsing
from minisgl_jax.server.messages import TextChunk
from minisgl_jax.server.reasoning import REASONING_FORMATS
from minisgl_jax.server.responses import ChatView, Choices
from minisgl_jax.server.tool_parsers import FORMATS
from minisgl_jax.server.tool_templates import bundled_template, tool_template
from minisgl_jax.server.tokenizer_worker import render_chat
from tiny_tokenizers import tiny_bpe_tokenizer

OUTPUT = ('<think>\nThe user wants the weather; <tool_call> is how I ask.\n</think>\n\nLet me look.\n'
          '<tool_call>\n{"name": "wx", "arguments": {"city": "Oslo"}}\n</tool_call>')
QWEN3 = ChatParsing(FORMATS["hermes"], False, REASONING_FORMATS["qwen3"])


def run_view(parsing: ChatParsing, text: str, step: int, reason: str = "stop") -> tuple[list[dict], dict]:
    """(the streamed choices' deltas and finish reasons, the whole response) of one choice's `text`."""
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    chunks = [TextChunk("r/0", piece, [], i == len(pieces) - 1, reason if i == len(pieces) - 1 else None, [], 1, i, 0)
              for i, piece in enumerate(pieces)]
    streamed, choices = ChatView("r", "m", None, parsing), Choices(1, 1)
    events = []
    for chunk in chunks:
        choices.add(chunk)
        events += [json.loads(line[len("data: "):]) for line in streamed.stream(chunk, choices)]
    return [e["choices"][0] for e in events], ChatView("r", "m", None, parsing).final(choices)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_reasoning_content_and_tool_calls_stream_as_the_whole_message(step):
    streamed, whole = run_view(QWEN3, OUTPUT, step)
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "\nThe user wants the weather; <tool_call> is how I ask.\n"
    assert message["content"] == "Let me look."
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "wx", "arguments": '{"city": "Oslo"}'} and call["type"] == "function"
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [c["delta"] for c in streamed]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    items = [item for d in deltas for item in d.get("tool_calls", [])]
    assert [i["function"]["name"] for i in items if "name" in i["function"]] == ["wx"]
    assert "".join(i["function"]["arguments"] for i in items) == call["function"]["arguments"]
    assert [c["finish_reason"] for c in streamed if c["finish_reason"]] == ["tool_calls"]


def test_reasoning_held_back_comes_in_one_delta_once_it_ends():
    parsing = ChatParsing(None, False, REASONING_FORMATS["qwen3"], stream_reasoning=False)
    streamed, whole = run_view(parsing, "<think>abc def</think>answer", 2)
    reasoning = [c["delta"]["reasoning_content"] for c in streamed if "reasoning_content" in c["delta"]]
    assert reasoning == ["abc def"] and whole["choices"][0]["message"]["content"] == "answer"


def test_a_cut_off_answer_keeps_its_finish_reason_and_text():
    streamed, whole = run_view(QWEN3, "<think>x</think>plain words", 3, reason="length")
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "plain words"
    assert "tool_calls" not in choice["message"]


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "wx", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "wx", "description": "the weather", "parameters": CITY}}]


@pytest.mark.parametrize("family, call_text", [
    ("hermes", '<tool_call>\n{"name": "wx", "arguments": {"city": "Oslo"}}\n</tool_call>'),
    ("llama3_json", '{"name": "wx", "parameters": {"city": "Oslo"}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "wx", "arguments": {"city": "Oslo"}, "id": "call_1"}]'),
])
def test_bundled_templates_render_tools_calls_and_results(family, call_text):
    tokenizer = tiny_bpe_tokenizer(chat_template=bundled_template(family))
    text = tokenizer.decode(render_chat(tokenizer, CONVERSATION, {}, TOOLS))
    assert '"name": "wx", "description": "the weather"' in text
    assert call_text in text and "sunny, 21C" in text and "be brief" in text and "weather in Oslo?" in text


def test_the_bundled_template_serves_tool_requests_where_the_own_renders_no_tools():
    plain = tiny_bpe_tokenizer(chat_template="{% for m in messages %}{{ m.content }}|{% endfor %}")
    template = tool_template(plain, "hermes", chosen=False)
    assert template == bundled_template("hermes")
    assert plain.decode(render_chat(plain, CONVERSATION[:2], {}, None, template)) == "be brief|weather in Oslo?|"
    assert "<tool_call>" in plain.decode(render_chat(plain, CONVERSATION, {}, None, template))  # tool messages
    assert "<tools>" in plain.decode(render_chat(plain, CONVERSATION[:2], {}, TOOLS, template))
    own = "{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert tool_template(tiny_bpe_tokenizer(chat_template=own), "hermes", chosen=False) is None
    assert tool_template(plain, "hermes", chosen=True) is None  # --chat-template serves every request
    assert tool_template(plain, None, chosen=False) is None
