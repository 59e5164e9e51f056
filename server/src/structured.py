"""From a request's structured-output fields to the one grammar its SamplingParams carry.

response_format (OpenAI's), SGLang's `regex` / `ebnf` / `json_schema`, and tool_choice "required"
or a named function (a grammar in the tool-call format of the model's family, so the arguments
always parse and match the function's parameters). Every grammar is checked here, so an invalid
one is a 400 naming its field before the request is queued; errors are ValueErrors whose first
word is that field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from minisgl_jax.core import GRAMMAR_FIELDS, SamplingParams
from minisgl_jax.grammar import ANY_JSON_OBJECT, GrammarSpec, check_grammar
from minisgl_jax.grammar.spec import COMPACT_JSON
from minisgl_jax.server.reasoning import ReasoningFormat
from minisgl_jax.server.tool_parsers import ToolCallFormat


def grammar_fields(
    response_format: dict[str, Any] | None, regex: str | None, ebnf: str | None, json_schema: str | dict | None,
    prefix: str = "",
) -> dict[str, str]:
    """The SamplingParams grammar field these request fields ask for ({} for free text), checked.

    `response_format` is the request's, as a plain map (type, json_schema: {name, schema, strict});
    `prefix` goes before field names in errors ("sampling_params." for /generate).
    """
    chosen: list[GrammarSpec] = []
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        chosen.append(GrammarSpec("json_schema", ANY_JSON_OBJECT, "response_format"))
    elif kind == "json_schema":
        described = response_format.get("json_schema")
        if described is None:
            raise ValueError("response_format.json_schema is required when response_format.type is json_schema")
        schema = described.get("schema")
        source = ANY_JSON_OBJECT if schema is None else json.dumps(schema)
        chosen.append(GrammarSpec("json_schema", source, "response_format.json_schema.schema"))
    if regex is not None:
        chosen.append(GrammarSpec("regex", regex, f"{prefix}regex"))
    if ebnf is not None:
        chosen.append(GrammarSpec("ebnf", ebnf, f"{prefix}ebnf"))
    if json_schema is not None:
        source = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        chosen.append(GrammarSpec("json_schema", source, f"{prefix}json_schema"))
    if len(chosen) > 1:
        raise ValueError(f"{chosen[1].field} cannot be combined with {chosen[0].field}: give one grammar at most")
    if not chosen:
        return {}
    check_grammar(chosen[0])
    return {chosen[0].kind: chosen[0].source}


def tool_call_grammar(fmt: ToolCallFormat, functions: list[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar (llguidance's) of one or more calls of `functions` in `fmt`, arguments per schema.

    `functions` are the tools' `function` maps (name, parameters); calls are compact JSON, the name
    first. The output is the calls and nothing else, so no marker opens them (Mistral's [TOOL_CALLS]
    is a special token, which a grammar literal cannot stand for): parse it with `constrained=True`.
    """
    bodies = []
    for index, function in enumerate(functions):
        parameters = function.get("parameters") or {"type": "object"}
        check_grammar(GrammarSpec("json_schema", json.dumps(parameters), f"tools[{index}].function.parameters"))
        schema = {
            "type": "object", "properties": {"name": {"const": function["name"]}, fmt.arguments_key: parameters},
            "required": ["name", fmt.arguments_key], "additionalProperties": False, "x-guidance": COMPACT_JSON,
        }
        bodies.append(f"fn_{index}: %json {json.dumps(schema)}")
    call = _concat(fmt.call_prefix, "body", fmt.call_suffix)
    calls = f'call ({json.dumps(fmt.separator)} call)*' if parallel else "call"
    lines = [
        "%llguidance {}",
        f"start: {_concat(fmt.list_open, calls, fmt.list_close)}",
        f"call: {call}",
        "body: " + " | ".join(f"fn_{index}" for index in range(len(functions))),
        *bodies,
    ]
    grammar = "\n".join(lines) + "\n"
    check_grammar(GrammarSpec("lark", grammar, "tools"))
    return grammar


def _concat(before: str, rule: str, after: str) -> str:
    """`rule` between two literals, either of them possibly empty."""
    return " ".join(part for part in (json.dumps(before) if before else "", rule, json.dumps(after) if after else "")
                    if part)


def grammar_after_reasoning(params: SamplingParams, fmt: ReasoningFormat) -> SamplingParams:
    """`params` with its grammar applying once a reasoning model's thinking has ended (`after_reasoning`)."""
    grammar = {name: getattr(params, name) for name in GRAMMAR_FIELDS if getattr(params, name) is not None}
    return dataclasses.replace(params, **{**dict.fromkeys(GRAMMAR_FIELDS), **after_reasoning(grammar, fmt)})


def after_reasoning(grammar: dict[str, str], fmt: ReasoningFormat) -> dict[str, str]:
    """`grammar` (a SamplingParams grammar field) applied only once the reasoning section has ended:
    the thinking is free text up to the end tag, then up to two newlines, then the grammar.

    A JSON Schema (an object), a regex and a Lark grammar are wrapped; a GBNF grammar or a boolean
    schema is returned as it is, and applies from the first token (the model cannot think then).
    """
    ((kind, source),) = grammar.items()
    if kind == "json_schema":
        schema = json.loads(source)
        if not isinstance(schema, dict):
            return grammar
        lark = f"start: %json {json.dumps({**schema, 'x-guidance': COMPACT_JSON})}\n"
    elif kind == "regex":
        lark = "start: /" + source.replace("/", "\\/") + "/\n"
    elif kind == "lark":
        lark = source
    else:
        return grammar
    header, rules = ("%llguidance {}\n", lark.removeprefix("%llguidance {}\n")) if lark.startswith("%llguidance") \
        else ("", lark)
    if not rules.startswith("start:"):
        return grammar
    opening = "" if fmt.starts_inside else f"{json.dumps(fmt.start)} "
    wrapped = (f"{header}start: {opening}reasoning (\"\\n\" \"\\n\"?)? answer\n"
               f"reasoning[stop={json.dumps(fmt.end)}]: /(?s:.*)/\n"
               f"answer:{rules.removeprefix('start:')}")
    return {"lark": wrapped}
