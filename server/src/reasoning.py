"""A reasoning model's thinking, `<think>...</think>`, split from its answer: whole or streamed.

Qwen3 (`--reasoning-parser qwen3`) writes `<think>` itself when it thinks; with
`enable_thinking: false` its template closes an empty think block in the prompt, and the output
is all answer. A model whose template opens the block in the prompt (DeepSeek-R1's, Qwen3's
thinking-only releases) starts inside it: `deepseek_r1`. The answer's leading whitespace after
`</think>` is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    starts_inside: bool = False  # the prompt opened the block: the output begins with thinking


REASONING_FORMATS = {
    "qwen3": ReasoningFormat("qwen3"),
    "deepseek_r1": ReasoningFormat("deepseek_r1", starts_inside=True),
}


def _held_prefix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ReasoningParser:
    """One choice's text -> (reasoning, answer) deltas; the answer goes on to tool parsing."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self.reasoning = ""
        self.answer = ""
        self._state = "reasoning" if fmt.starts_inside else "undecided"
        self._pos = 0  # text before it is accounted for

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, answer delta) of the new text."""
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """What was held back: an unfinished tag is text after all."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, answer = "", ""
        if self._state == "undecided":
            stripped = self.text[self._pos:].lstrip(_WHITESPACE)
            if stripped.startswith(self.fmt.start):
                self._pos = len(self.text) - len(stripped) + len(self.fmt.start)
                self._state = "reasoning"
            elif final or (stripped and not self.fmt.start.startswith(stripped)):
                self._state = "answer"
            else:
                return "", ""
        if self._state == "reasoning":
            end = self.text.find(self.fmt.end, self._pos)
            if end >= 0:
                reasoning = self.text[self._pos:end]
                self._pos = end + len(self.fmt.end)
                self._state = "after"
            else:
                stop = len(self.text) if final else len(self.text) - _held_prefix(self.text, self.fmt.end)
                reasoning = self.text[self._pos:stop]
                self._pos = stop
        if self._state == "after":  # drop the whitespace between </think> and the answer
            stripped = self.text[self._pos:].lstrip(_WHITESPACE)
            self._pos = len(self.text) - len(stripped)
            if stripped:
                self._state = "answer"
        if self._state == "answer":
            answer = self.text[self._pos:]
            self._pos = len(self.text)
        self.reasoning += reasoning
        self.answer += answer
        return reasoning, answer
