"""Tool calls in a model's text, per model family: parsed whole or as OpenAI's streamed deltas.

Every family writes a call as a JSON object with the function's name and its arguments; they
differ in what opens the calls and what lies between them:

    hermes (Qwen2.5, Qwen3):  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>  (one block per call)
    llama3_json (Llama 3.x):  {"name": "f", "parameters": {...}}  (the whole output; calls joined by "; ")
    mistral:                  [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]

The parser reads the text as it grows. Text before the calls is content; once they open, each
call's name is announced when its string is complete, and its arguments stream as the raw text of
the JSON value (so the fragments concatenate to exactly the final arguments). A streamed and a
whole parse of the same text give the same content and calls. Output whose calls never parse
(a model that only looked like it would call) is returned as content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open its calls with it


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family writes its tool calls (the grammar for tool_choice "required" writes them so too)."""

    name: str
    start: str  # opens the calls anywhere in the output; "" when only `leads` can open them
    arguments_key: str
    call_prefix: str  # around each call object, and between calls
    call_suffix: str
    separator: str
    list_open: str = ""  # around all calls
    list_close: str = ""
    # What may stand between call objects besides whitespace (the family's own markers).
    fillers: tuple[str, ...] = ()
    # What opens the calls when the output begins with it: Llama's bare JSON, and Mistral's list,
    # whose [TOOL_CALLS] marker is a special token that the detokenizer leaves out of the text.
    leads: tuple[str, ...] = ()


FORMATS = {
    "hermes": ToolCallFormat("hermes", "<tool_call>", "arguments", "<tool_call>\n", "\n</tool_call>", "\n",
                             fillers=("<tool_call>", "</tool_call>")),
    "llama3_json": ToolCallFormat("llama3_json", "", "parameters", "", "", "; ", fillers=(PYTHON_TAG, ";"),
                                  leads=("{", PYTHON_TAG)),
    "mistral": ToolCallFormat("mistral", "[TOOL_CALLS]", "arguments", "", "", ",", "[", "]",
                              fillers=("[TOOL_CALLS]", "[", "]", ","),
                              leads=("[",)),
}
# The parser of each model type we serve (config.json's model_type), when --tool-call-parser is not given.
MODEL_TYPE_PARSERS = {"qwen2": "hermes", "qwen3": "hermes", "qwen2_moe": "hermes", "qwen3_moe": "hermes",
                      "llama": "llama3_json", "mistral": "mistral"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's function.arguments

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _CallState:
    start: int  # offset of the call's "{" in the text
    id: str = field(default_factory=new_call_id)
    name: str | None = None
    arguments_sent: int = 0
    end: int | None = None
    arguments: str = ""


class ToolCallParser:
    """One choice's text -> content and tool calls; `feed` returns the deltas of each new piece."""

    def __init__(self, fmt: ToolCallFormat, constrained: bool = False) -> None:
        """`constrained`: the output is the calls and nothing else (the grammar of tool_choice
        "required" or a named function), without the marker that would open them."""
        self.fmt = fmt
        self.text = ""
        self.content = ""  # content emitted so far
        self._calls_at: int | None = 0 if constrained else None  # where the calls begin in text, once known
        self._content_only = False  # the text can no longer open calls (llama3_json: it did not begin with "{")
        self._calls: list[_CallState] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls whose name is out; the last one's arguments are cut short if the output was."""
        return [ToolCall(c.id, c.name, c.arguments) for c in self._calls if c.name is not None]

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Deltas for the new text: {"content": str} and {"tool_call": OpenAI's delta.tool_calls item}."""
        self.text += delta
        out: list[dict[str, Any]] = []
        if self._calls_at is None:
            self._find_start(out)
        if self._calls_at is not None:
            self._scan_calls(out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The last deltas: held-back content, or, when no call parsed, the calls' text as content."""
        out: list[dict[str, Any]] = []
        if self._calls_at is None:
            self._emit_content(self.text[len(self.content):], out)
        elif not self.calls:
            self._emit_content(self.text[len(self.content):], out)
            self._calls_at = None
        return out

    def _emit_content(self, text: str, out: list[dict[str, Any]]) -> None:
        if text:
            self.content += text
            out.append({"content": text})

    def _find_start(self, out: list[dict[str, Any]]) -> None:
        if self._content_only:
            self._emit_content(self.text[len(self.content):], out)
            return
        if self.fmt.leads and not self.content:  # the output may begin with the calls
            stripped = self.text.lstrip(_WHITESPACE)
            if any(stripped.startswith(lead) for lead in self.fmt.leads):
                self._calls_at = len(self.text) - len(stripped)
                return
            if not stripped or any(lead.startswith(stripped) for lead in self.fmt.leads):
                return
            if not self.fmt.start:
                self._content_only = True
                self._emit_content(self.text[len(self.content):], out)
                return
        found = self.text.find(self.fmt.start, len(self.content))
        if found >= 0:
            self._emit_content(self.text[len(self.content):found].rstrip(_WHITESPACE), out)
            self._calls_at = found + len(self.fmt.start)
            return
        # Hold back what could still become the start marker, and trailing whitespace before it.
        safe = len(self.text)
        for size in range(min(len(self.fmt.start) - 1, len(self.text)), 0, -1):
            if self.fmt.start.startswith(self.text[-size:]):
                safe -= size
                break
        safe = len(self.text[:safe].rstrip(_WHITESPACE))
        self._emit_content(self.text[len(self.content):safe], out)

    def _scan_calls(self, out: list[dict[str, Any]]) -> None:
        while True:
            if not self._calls or self._calls[-1].end is not None:
                begin = self._next_object(self._calls[-1].end if self._calls else self._calls_at)
                if begin is None:
                    return
                self._calls.append(_CallState(begin))
            call = self._calls[-1]
            members, end = _scan_object(self.text, call.start)
            index = len(self._calls) - 1
            if call.name is None and "name" in members and members["name"][1] is not None:
                name = _DECODER.raw_decode(self.text, members["name"][0])[0]
                if not isinstance(name, str):
                    return
                call.name = name
                out.append({"tool_call": {"index": index, "id": call.id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}})
            value = members.get(self.fmt.arguments_key)
            if call.name is not None and value is not None:
                raw = self.text[value[0]: value[1] if value[1] is not None else len(self.text)]
                if len(raw) > call.arguments_sent:
                    out.append({"tool_call": {"index": index, "function": {"arguments": raw[call.arguments_sent:]}}})
                    call.arguments_sent = len(raw)
                call.arguments = raw
            if end is None:
                return
            call.end = end
            if call.name is not None and value is None:  # a call without arguments: {} as OpenAI's
                call.arguments = "{}"
                out.append({"tool_call": {"index": index, "function": {"arguments": "{}"}}})

    def _next_object(self, pos: int) -> int | None:
        """The offset of the next call's "{" at or after `pos`, past whitespace and the family's fillers."""
        while pos < len(self.text):
            if self.text[pos] in _WHITESPACE:
                pos += 1
                continue
            filler = next((f for f in self.fmt.fillers if self.text.startswith(f, pos)), None)
            if filler is not None:
                pos += len(filler)
                continue
            return pos if self.text[pos] == "{" else None
        return None


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _scan_object(text: str, pos: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The members of the JSON object at text[pos] ("{") so far, key -> (value start, value end or
    None while incomplete), and the object's end (None while incomplete or malformed)."""
    members: dict[str, tuple[int, int | None]] = {}
    i = _skip_whitespace(text, pos + 1)
    while i < len(text):
        if text[i] == "}":
            return members, i + 1
        if text[i] == ",":
            i = _skip_whitespace(text, i + 1)
            continue
        try:
            key, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return members, None
        i = _skip_whitespace(text, i)
        if not isinstance(key, str) or i >= len(text) or text[i] != ":":
            return members, None
        start = _skip_whitespace(text, i + 1)
        if start >= len(text):
            return members, None
        try:
            value, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            members[key] = (start, None)
            return members, None
        if end == len(text) and isinstance(value, int | float):  # more digits may follow
            members[key] = (start, None)
            return members, None
        members[key] = (start, end)
        i = _skip_whitespace(text, end)
    return members, None


def tool_parser_name(requested: str | None, model_type: str | None) -> str | None:
    """--tool-call-parser's value if given (checked), else the model type's family, else None."""
    if requested is not None:
        if requested not in FORMATS:
            raise ValueError(f"tool_call_parser must be one of {sorted(FORMATS)}, got {requested!r}")
        return requested
    return MODEL_TYPE_PARSERS.get(model_type or "")
