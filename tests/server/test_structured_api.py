"""Structured outputs and tool calls end to end, through the official `openai` client, against the
shared server (a tiny random-weight Qwen3, the byte-level fallback tokenizer, the bundled hermes
template): whatever the garbage model samples, the grammar makes every completion valid."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
# Short: the tiny model's context is 512 tokens, one a byte here, and the tool definition is in the prompt.
TOOL = {"type": "function", "function": {"name": "wx", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}, "d": {"type": "integer", "minimum": 1,
                                                                              "maximum": 7}},
    "required": ["city", "d"], "additionalProperties": False}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_json_schema_completions_all_validate(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):  # one at a time: batches of one compile the fewest programs
        choice = client.chat.completions.create(model=model, messages=HI, response_format=response_format,
                                                max_tokens=60, seed=seed).choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    celsius: int = Field(ge=-40, le=50)
    rain: bool


def test_the_sdk_parse_helper_gets_its_pydantic_model(client, model):
    completion = client.beta.chat.completions.parse(model=model, messages=HI, response_format=Forecast,
                                                    max_tokens=60, seed=1)
    assert isinstance(completion.choices[0].message.parsed, Forecast)


def test_regex_and_ebnf_outputs_match(server, client, model):
    pattern = "(yes|no), [0-9]{1,3}"
    reply = client.completions.create(model=model, prompt="hi", max_tokens=20, seed=2, extra_body={"regex": pattern})
    assert re.fullmatch(pattern, reply.choices[0].text), reply
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 20, "seed": 5,
                                              "ebnf": 'root ::= word (" " word)?\nword ::= "cat" | "dog"'}}
    text = httpx.post(server.url + "/generate", json=body, timeout=60).json()["text"]
    assert re.fullmatch("(cat|dog)( (cat|dog))?", text), text


def test_json_object_output_opens_an_object(client, model):
    reply = client.chat.completions.create(model=model, messages=HI, response_format={"type": "json_object"},
                                           max_tokens=8, seed=4)
    assert reply.choices[0].message.content.startswith("{")


def test_required_tool_call_round_trip(client, model):
    call = client.chat.completions.create(model=model, messages=HI, tools=[TOOL], tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=80, seed=7)
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "wx" and tool_call.id.startswith("call_")
    jsonschema.validate(json.loads(tool_call.function.arguments), TOOL["function"]["parameters"])
    messages = [*HI, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[TOOL], tool_choice="none",
                                            max_tokens=5, seed=7)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_deltas_add_up_to_the_whole_call(client, model):
    named = {"type": "function", "function": {"name": "wx"}}
    args = dict(model=model, messages=HI, tools=[TOOL], tool_choice=named, max_tokens=80, seed=11)
    whole = client.chat.completions.create(**args).choices[0]
    names, arguments, finishes = [], "", []
    for chunk in client.chat.completions.create(**args, stream=True):
        delta = chunk.choices[0].delta
        for item in delta.tool_calls or []:
            assert item.index == 0
            names += [item.function.name] if item.function.name else []
            arguments += item.function.arguments or ""
        finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert names == ["wx"] and finishes == ["tool_calls"]
    assert arguments == whole.message.tool_calls[0].function.arguments


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"regex": "a(b"}, "regex"),
    ({"ebnf": "root ::= undefined_rule"}, "ebnf"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required", "regex": "a"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_a_bad_grammar_or_tool_field_is_a_400_naming_it(server, body, param):
    reply = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 4, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text
