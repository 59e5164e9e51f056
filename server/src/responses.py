"""Response bodies: each choice's state as chunks arrive, rendered as OpenAI objects or SSE events."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from minisgl_jax.server.chat_output import ChatOutputParser, ChatParsing
from minisgl_jax.server.messages import TextChunk, TokenLogprobText
from minisgl_jax.server.protocol import StreamOptions


@dataclass
class ChoiceState:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobText] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Choices:
    """All choices of one request: `count` = prompts x n, choice i answers prompt i // n."""

    def __init__(self, count: int, n: int) -> None:
        self.items = [ChoiceState() for _ in range(count)]
        self.n = n

    def add(self, chunk: TextChunk) -> int:
        index = int(chunk.rid.rsplit("/", 1)[1])
        state = self.items[index]
        state.text += chunk.text
        state.token_ids += chunk.token_ids
        state.logprobs += chunk.logprobs
        state.prompt_tokens, state.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        state.cached_tokens = chunk.cached_tokens
        if chunk.finished:
            state.finish_reason = chunk.finish_reason
        return index

    @property
    def all_finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.items)

    def usage(self) -> dict[str, Any]:
        firsts = self.items[:: self.n]  # the prompt is counted once per prompt, not per sample
        prompt = sum(s.prompt_tokens for s in firsts)
        completion = sum(s.completion_tokens for s in self.items)
        return {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)},
        }


# Characters that JSON may carry raw but that many clients' line readers (httpx's iter_lines,
# Python's str.splitlines) take for line ends, cutting an event in two: sent escaped.
LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False).translate(LINE_BREAKING)}\n\n"


def chat_logprobs(entries: list[TokenLogprobText]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**one(e.token, e.logprob), "top_logprobs": [one(t.token, t.logprob) for t in e.top]} for e in entries
    ]}


def completion_logprobs(entries: list[TokenLogprobText], offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


class _OpenAIView:
    """What chat and completions share: ids, usage in streams, the final usage chunk."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, rid: str, model: str, stream_options: StreamOptions | None) -> None:
        self.rid, self.model, self.created = rid, model, int(time.time())
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous_usage = bool(stream_options and stream_options.continuous_usage_stats)

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> str:
        body = {"id": self.rid, "object": self.chunk_object_name, "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage or self.continuous_usage:
            body["usage"] = usage
        return sse(body)

    def stream(self, chunk: TextChunk | None, choices: Choices) -> list[str]:
        if chunk is None:
            return self._opening(choices)
        index = int(chunk.rid.rsplit("/", 1)[1])
        lines = []
        if chunk.text or chunk.logprobs or chunk.finished:
            state = choices.items[index]
            choice = self._stream_choice(index, chunk, len(state.text) - len(chunk.text))
            usage = choices.usage() if self.continuous_usage else None
            lines.append(self._chunk([choice], usage))
        if choices.all_finished and self.include_usage:
            lines.append(self._chunk([], choices.usage()))
        return lines

    def _opening(self, choices: Choices) -> list[str]:
        return []

    def _stream_choice(self, index: int, chunk: TextChunk, text_offset: int) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, choices: Choices) -> dict[str, Any]:
        return {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [self._final_choice(i, s) for i, s in enumerate(choices.items)], "usage": choices.usage()}

    def _final_choice(self, index: int, state: ChoiceState) -> dict[str, Any]:
        raise NotImplementedError


class ChatView(_OpenAIView):
    """Chat choices; with `parsing`, each choice's text is split into content, reasoning_content and
    tool_calls (finish_reason "tool_calls" when it made any), streamed and whole alike."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, rid: str, model: str, stream_options: StreamOptions | None,
                 parsing: ChatParsing | None = None) -> None:
        super().__init__(rid, model, stream_options)
        self.parsing = parsing
        self._parsers: dict[int, ChatOutputParser] = {}  # streamed choices, by index

    def _finish_reason(self, reason: str | None, parser: ChatOutputParser | None) -> str | None:
        return "tool_calls" if reason == "stop" and parser is not None and parser.has_tool_calls else reason

    def _opening(self, choices: Choices) -> list[str]:
        """The first event of each choice carries the assistant role, as OpenAI's do."""
        return [
            self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], None)
            for i in range(len(choices.items))
        ]

    def _stream_choice(self, index: int, chunk: TextChunk, text_offset: int) -> dict[str, Any]:
        parser = None
        if self.parsing is None:
            delta = {"content": chunk.text} if chunk.text else {}
        else:
            parser = self._parsers.setdefault(index, ChatOutputParser(self.parsing))
            delta = parser.feed(chunk.text, chunk.finished)
        return {"index": index, "delta": delta, "logprobs": chat_logprobs(chunk.logprobs) if chunk.logprobs else None,
                "finish_reason": self._finish_reason(chunk.finish_reason, parser) if chunk.finished else None}

    def _final_choice(self, index: int, state: ChoiceState) -> dict[str, Any]:
        parser = None
        message: dict[str, Any] = {"role": "assistant", "content": state.text}
        if self.parsing is not None:
            parser = ChatOutputParser(self.parsing)
            parser.feed(state.text, finished=True)
            message.update(parser.message())
        return {"index": index, "message": message,
                "logprobs": chat_logprobs(state.logprobs) if state.logprobs else None,
                "finish_reason": self._finish_reason(state.finish_reason, parser)}


class CompletionView(_OpenAIView):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _stream_choice(self, index: int, chunk: TextChunk, text_offset: int) -> dict[str, Any]:
        logprobs = completion_logprobs(chunk.logprobs, text_offset) if chunk.logprobs else None
        return {"index": index, "text": chunk.text, "logprobs": logprobs,
                "finish_reason": chunk.finish_reason if chunk.finished else None}

    def _final_choice(self, index: int, state: ChoiceState) -> dict[str, Any]:
        logprobs = completion_logprobs(state.logprobs, 0) if state.logprobs else None
        return {"index": index, "text": state.text, "logprobs": logprobs, "finish_reason": state.finish_reason}


class NativeView:
    """/generate, shaped as SGLang's native API: cumulative text and ids, and a meta_info map."""

    def __init__(self, rid: str) -> None:
        self.rid = rid

    def _body(self, state: ChoiceState) -> dict[str, Any]:
        return {"text": state.text, "output_ids": state.token_ids, "meta_info": {
            "id": self.rid, "finish_reason": state.finish_reason, "prompt_tokens": state.prompt_tokens,
            "completion_tokens": state.completion_tokens, "cached_tokens": state.cached_tokens,
        }}

    def stream(self, chunk: TextChunk | None, choices: Choices) -> list[str]:
        if chunk is None or not (chunk.text or chunk.finished):
            return []
        return [sse(self._body(choices.items[0]))]

    def final(self, choices: Choices) -> dict[str, Any]:
        return self._body(choices.items[0])
