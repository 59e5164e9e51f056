"""One chat choice's text as OpenAI's message: reasoning split off first, then tool calls parsed
from the answer; streamed as `delta` maps, or whole as the final `message`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minisgl_jax.server.reasoning import ReasoningFormat, ReasoningParser
from minisgl_jax.server.tool_parsers import ToolCallFormat, ToolCallParser


@dataclass(frozen=True)
class ChatParsing:
    """How a request's choices are parsed: set by the server's flags and the request."""

    tool_format: ToolCallFormat | None = None  # None: no tool parsing (no tools, or tool_choice "none")
    tools_constrained: bool = False  # tool_choice "required" or a named function: the output is the calls
    reasoning: ReasoningFormat | None = None  # None: no reasoning parser, or separate_reasoning false
    stream_reasoning: bool = True  # false: the reasoning comes in one delta, once it has ended


class ChatOutputParser:
    """One choice: `feed` its text pieces as they come, then read `message`."""

    def __init__(self, parsing: ChatParsing) -> None:
        self.parsing = parsing
        self._reasoning = ReasoningParser(parsing.reasoning) if parsing.reasoning else None
        self._tools = ToolCallParser(parsing.tool_format, parsing.tools_constrained) if parsing.tool_format else None
        self._held_reasoning = ""
        self.content = ""

    @property
    def has_tool_calls(self) -> bool:
        return self._tools is not None and bool(self._tools.calls)

    def feed(self, text: str, finished: bool) -> dict[str, Any]:
        """The delta of `text` (the choice's next piece): content, reasoning_content and tool_calls as they apply."""
        reasoning, answer = self._reasoning.feed(text) if self._reasoning else ("", text)
        if finished and self._reasoning:
            more_reasoning, more_answer = self._reasoning.finish()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        delta: dict[str, Any] = {}
        if not self.parsing.stream_reasoning:
            self._held_reasoning += reasoning
            reasoning = ""
            if self._held_reasoning and (answer or finished):
                reasoning, self._held_reasoning = self._held_reasoning, ""
        if reasoning:
            delta["reasoning_content"] = reasoning
        if self._tools is None:
            content = answer
            calls: list[dict[str, Any]] = []
        else:
            pieces = self._tools.feed(answer) + (self._tools.finish() if finished else [])
            content = "".join(p["content"] for p in pieces if "content" in p)
            calls = _merged([p["tool_call"] for p in pieces if "tool_call" in p])
        if content:
            self.content += content
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta

    def message(self) -> dict[str, Any]:
        """The final message's fields, after the last `feed(..., finished=True)`."""
        message: dict[str, Any] = {"content": self.content or (None if self.has_tool_calls else "")}
        if self._reasoning is not None and self._reasoning.reasoning:
            message["reasoning_content"] = self._reasoning.reasoning
        if self.has_tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self._tools.calls]
        return message


def _merged(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call delta items with each call's consecutive argument fragments joined into one."""
    merged: list[dict[str, Any]] = []
    for item in items:
        last = merged[-1] if merged else None
        if last is not None and last["index"] == item["index"] and set(item) == {"index", "function"}:
            last["function"] = {**last["function"], "arguments": last["function"]["arguments"]
                                + item["function"]["arguments"]}
        else:
            merged.append({**item, "function": dict(item["function"])})
    return merged
