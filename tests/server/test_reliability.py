"""Reliability: many clients with random disconnects, garbage on the IPC sockets, fuzzed requests."""

import asyncio
import copy
import functools
import json
import operator
import os
import random
import re

import httpx
import msgpack
import pytest
import schemathesis
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from test_errors_and_aborts import wait_idle

from minisgl_jax.server import messages as m

COMPLETIONS = "/v1/completions"


def test_200_streams_with_random_disconnects_leave_nothing_behind(server):
    """20% of 200 concurrent streaming clients hang up at random points; the rest get the quiet-run answers."""
    prompts = [f"request number {i} says" for i in range(20)]
    body = {"max_tokens": 12, "ignore_eos": True, "temperature": 0}
    quiet = {p: httpx.post(server.url + COMPLETIONS, json={**body, "prompt": p}, timeout=60).json()["choices"][0]["text"]
             for p in prompts}
    rng = random.Random(0)
    plan = [(prompts[i % 20], rng.randint(1, 8) if rng.random() < 0.2 else None) for i in range(200)]

    async def one(client: httpx.AsyncClient, prompt: str, hang_up_after: int | None) -> str | None:
        text = []
        async with client.stream("POST", server.url + COMPLETIONS, json={**body, "prompt": prompt, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    if len(text) == hang_up_after:
                        return None  # leaving the block closes the connection mid-stream
                elif line == "data: [DONE]":
                    return "".join(text)
        raise AssertionError("the stream ended without [DONE]")

    async def run_all() -> list[str | None]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, p, k) for p, k in plan))

    results = asyncio.run(run_all())
    survivors = [(p, text) for (p, _), text in zip(plan, results) if text is not None]
    assert 140 <= len(survivors) < 200
    assert all(text == quiet[p] for p, text in survivors)
    wait_idle(server, timeout=30)
    assert server.metric("minisgl_kv_invariant_ok") == 1
    assert httpx.get(server.url + "/health").status_code == 200
    assert "disconnected: aborting it" in server.logs()


def test_garbage_on_the_ipc_sockets_is_logged_and_dropped(server):
    run_dir = re.search(r"IPC sockets in (\S+)", server.logs()).group(1)
    junk = [
        os.urandom(64),
        msgpack.packb({"type": "Pickle", "payload": b"\x80\x04"}),
        msgpack.packb({"type": "AbortReq", "rids": 7}),
        m.encode(m.FlushCacheReply("nobody", 3)),  # a real message, at the wrong process
        m.encode(m.TokenBatch([m.StepTokens("ghost/0", [5], True, "stop", [], 1, 1, 0)])),
        m.encode(m.TextBatch([m.TextChunk("ghost/0", "boo", [5], True, "stop", [], 1, 1, 0)])),
    ]
    context = zmq.Context()
    try:
        for process in ("api", "tokenizer", "scheduler", "detokenizer"):
            socket = context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 1000)
            socket.connect(f"ipc://{run_dir}/{process}.sock")
            for data in junk:
                socket.send(data)
            socket.close()
    finally:
        context.term()
    reply = httpx.post(server.url + COMPLETIONS, json={"prompt": "still there?", "max_tokens": 4, "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(server.url + "/health").status_code == 200
    logs = server.logs()
    assert "dropped a malformed message" in logs and "dropped an unexpected" in logs


# ---- fuzzing: schemathesis over the server's own OpenAPI schema, then what a schema cannot say --------

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CONTEXT = 512  # the test model's context length
SHORT = 4  # tokens: every fuzzed request that is valid finishes quickly
# Each generation endpoint's length fields; the first one is filled in when absent.
LENGTHS = {"/v1/chat/completions": ["max_tokens", "max_completion_tokens"], "/v1/completions": ["max_tokens"],
           "/generate": ["max_new_tokens"]}


def short_generation(case: Case) -> Case:
    """Lengths the context could hold become SHORT, absent ones too; longer ones stay, for the engine to refuse."""
    fields = case.body
    if case.path == "/generate" and isinstance(fields, dict):
        fields = fields.setdefault("sampling_params", {})
    if isinstance(fields, dict):
        for i, name in enumerate(LENGTHS.get(case.path, [])):
            value = fields.get(name)
            if (value is None and i == 0) or (type(value) is int and SHORT < value < CONTEXT):
                fields[name] = SHORT
    return case


def own_deadline(body: object, error: dict) -> bool:
    """A 504 at the deadline the request set itself: the documented answer (a busy 2-core machine may
    miss a tiny one), not a server fault."""
    return error["code"] == 504 and error["type"] == "timeout_error" and isinstance(body, dict) and "timeout" in body


def stream_errors(text: str) -> list[dict]:
    return [json.loads(line[6:])["error"] for line in text.splitlines() if line.startswith('data: {"error"')]


def assert_still_serving(server) -> None:
    """The server and its workers alive, every KV page accounted for, and a normal request answered."""
    assert server.proc.poll() is None, server.logs()
    wait_idle(server, timeout=30)
    assert server.metric("minisgl_kv_invariant_ok") == 1
    assert httpx.get(server.url + "/health").status_code == 200
    reply = httpx.post(server.url + COMPLETIONS, json={"prompt": "still there?", "max_tokens": 4, "ignore_eos": True},
                       timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


@pytest.fixture(scope="module")
def api_schema(server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_schemathesis_finds_no_server_error_in_any_operation(server, api_schema):
    """Valid and invalid requests to every operation of the schema: never a 5xx, in a status or a stream."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {COMPLETIONS, "/v1/chat/completions", "/generate", "/tokenize", "/health"}
    for operation in operations:
        # Negative data needs something to break: a body (a path parameter is any string).
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])

        @FUZZ
        @given(case=st.one_of(*(operation.as_strategy(mode) for mode in modes)).map(short_generation))
        def check(case: Case) -> None:
            response = case.call(base_url=server.url, timeout=60)
            if not (response.status_code == 504 and own_deadline(case.body, response.json()["error"])):
                case.validate_response(response, checks=[not_a_server_error])
            for error in stream_errors(response.text):
                assert error["code"] < 500 or own_deadline(case.body, error), (case.body, error)

        check()
    assert_still_serving(server)


# What a schema cannot say, as raw JSON text (json.dumps writes no NaN): numbers at and past the int32 and
# int64 limits, non-finite ones and one past float64's range, lone surrogates, NUL and control characters,
# long text, deep nesting.
NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "1e-320", "-1", str(2**31 - 1), str(2**31), str(2**63 - 1),
           str(2**63), str(-(2**63) - 1), str(2**64)]
TEXTS = [json.dumps(text) for text in ("\ud800", "a\udfffb", "\udc00\ud800", "\x00", "nul \x00 inside",
                                        "\x01\x07\x1b[2J\x7f", "\u2028\u2029\ufeff", "\U0010ffff", "long " * 6000)]
NESTINGS = ["[" * 40 + "0" + "]" * 40, '{"a": ' * 40 + "0" + "}" * 40, "[" * 5000 + "]" * 5000]
PLACEHOLDER = "@fuzzed@"


def valid_bodies(model: str) -> dict[str, list[dict]]:
    """Valid short requests per endpoint that between them set every number and string field of the schema
    (a null counts: it is fuzzed too); filters off and no logprobs, so they run the programs compiled at start-up."""
    sampling = {"model": model, "max_tokens": 2, "temperature": 0.5, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "n": 1,
                "stop": ["zz"], "stop_token_ids": [3], "seed": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "repetition_penalty": 1.0, "min_tokens": 0, "user": "ann", "timeout": 60.0}
    messages = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "hi", "name": "ann"}]
    native = {"max_new_tokens": 2, "temperature": 0.5, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "stop": ["zz"],
              "stop_token_ids": [3], "seed": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
              "repetition_penalty": 1.0, "min_new_tokens": 0}
    # Structured outputs and tools: one grammar a body; a tool call and its result in the conversation.
    schema = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 2}}, "required": ["q"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "description": "d", "schema": schema,
                                                              "strict": True}}
    grammars = [{"response_format": response_format}, {"regex": "[a-z]{1,2}"}, {"ebnf": 'root ::= "a" | "b"'},
                {"json_schema": '{"type": "integer", "minimum": 0, "maximum": 9}'}]
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": schema, "strict": True}}
    hi = [{"role": "user", "content": "hi"}]
    conversation = [*hi, {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"q": "a"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    tools = {"messages": conversation, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}},
             "parallel_tool_calls": False}
    return {
        "/v1/chat/completions": [{**sampling, "messages": messages, "max_completion_tokens": 2, "top_logprobs": 0,
                                  "chat_template_kwargs": {"greeting": "hello"}},
                                 {"max_tokens": 2, **tools},
                                 {"max_tokens": 2, "messages": hi, "tools": [tool], "tool_choice": "required"},
                                 *({"messages": hi, "max_tokens": 2, **g} for g in grammars)],
        COMPLETIONS: [{**sampling, "prompt": "hi", "logprobs": None, "best_of": 1, "suffix": ""},
                      {"prompt": [[1, 2], [3]], "max_tokens": 2},
                      *({"prompt": "hi", "max_tokens": 2, **g} for g in grammars)],
        "/generate": [{"model": model, "text": "hi", "timeout": 60.0, "sampling_params": native},
                      {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}},
                      *({"text": "hi", "sampling_params": {"max_new_tokens": 2, **g}} for g in grammars[1:])],
        "/tokenize": [{"model": model, "prompt": "hi"}, {"model": model, "messages": messages},
                      {"messages": conversation}],
        "/detokenize": [{"model": model, "tokens": [1, 2]}],
    }


def leaves(value: object, path: tuple = ()) -> list[tuple]:
    """The path to every scalar in a JSON value."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in leaves(item, (*path, key))]
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in leaves(item, (*path, i))]
    return [path]


def schema_fields(schema: dict, defs: dict, prefix: str = "") -> set[str]:
    """The dotted names of a request schema's number, integer and string fields (a list's items take its name)."""
    names = set()
    for alternative in schema.get("anyOf", [schema]):
        if "$ref" in alternative:
            alternative = defs[alternative["$ref"].rsplit("/", 1)[1]]
        kind = alternative.get("type")
        if kind == "object":
            for name, field in alternative.get("properties", {}).items():
                names |= schema_fields(field, defs, f"{prefix}{name}.")
        elif kind == "array":
            names |= schema_fields(alternative.get("items", {}), defs, prefix)
        elif kind in ("number", "integer", "string"):
            names.add(prefix.rstrip("."))
    return names


def with_fragment(body: dict, path: tuple, fragment: str) -> bytes:
    """`body` as JSON text, with the value at `path` replaced by the JSON text `fragment`."""
    body = copy.deepcopy(body)
    *parents, last = path
    functools.reduce(operator.getitem, parents, body)[last] = PLACEHOLDER
    return json.dumps(body).replace(json.dumps(PLACEHOLDER), fragment).encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", COMPLETIONS, "/generate", "/tokenize", "/detokenize"])
def test_extreme_values_in_any_field_never_get_a_5xx(server, path):
    """Every text field with each of TEXTS and every other value with each of NUMBERS; then, drawn by
    hypothesis, any of those or a deep nesting in place of any value."""
    client = httpx.Client(base_url=server.url, timeout=60)
    bodies = valid_bodies(client.get("/v1/models").json()["data"][0]["id"])[path]
    openapi = client.get("/openapi.json").json()
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    covered = {".".join(p for p in leaf if isinstance(p, str)) for body in bodies for leaf in leaves(body)}
    assert schema_fields(schema, openapi["components"]["schemas"]) <= covered  # every field gets fuzzed
    for body in bodies:
        response = client.post(path, json=body)
        assert response.status_code == 200, (body, response.text)

    def send(body: dict, leaf: tuple, fragment: str) -> None:
        response = client.post(path, content=with_fragment(body, leaf, fragment),
                               headers={"content-type": "application/json"})
        errors = stream_errors(response.text) + ([response.json()["error"]] if response.status_code >= 400 else [])
        for error in errors:
            assert error["code"] < 500 or own_deadline(body, error), (leaf, fragment, error)

    for body in bodies:
        for leaf in leaves(body):
            is_text = isinstance(functools.reduce(operator.getitem, leaf, body), str)
            for fragment in TEXTS if is_text else NUMBERS:
                send(body, leaf, fragment)

    @settings(FUZZ, max_examples=40)
    @given(mutation=st.sampled_from(bodies).flatmap(lambda body: st.tuples(
        st.just(body), st.sampled_from(leaves(body)), st.sampled_from(NUMBERS + TEXTS + NESTINGS))))
    def anything_anywhere(mutation: tuple[dict, tuple, str]) -> None:
        send(*mutation)

    anything_anywhere()
    assert_still_serving(server)
