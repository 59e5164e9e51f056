"""Incremental detokenization: text deltas that never split a UTF-8 character, with stop strings."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Tokens decoded again before the new ones, so merges and leading spaces come out as in a full decode.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas, in O(new tokens) per call.

    A trailing U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes
    it; so are the last characters that could still begin a stop string. Once a stop string
    appears, the text ends before it and `stopped` is True.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = list((prompt_token_ids or [])[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pending = ""  # decoded but not yet emitted (could start a stop string)
        self.text = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """The new text delta after appending `token_ids`."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character: wait for the next token
        self._pending += full[len(prefix) :]
        self._prefix_offset, self._read_offset = max(0, len(self._ids) - CONTEXT_TOKENS), len(self._ids)
        return self._emit(final=False)

    def add_until_stop(self, token_ids: list[int]) -> tuple[str, int]:
        """(text delta, how many of `token_ids` it used): with stop strings the tokens go in one at a
        time and those after the one that completes a stop string are left out, so a burst of
        several tokens reports the same tokens as single steps would."""
        if not self.stop:
            return self.add(token_ids), len(token_ids)
        text = ""
        for used, token in enumerate(token_ids, start=1):
            text += self.add([token])
            if self.stopped:
                return text, used
        return text, len(token_ids)

    def flush(self) -> str:
        """Whatever is still held back at the end of the request, an incomplete character as U+FFFD."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._pending += self._decode(self._ids[self._prefix_offset :])[len(prefix) :]
            self._read_offset = len(self._ids)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        searched = self.text[-self._hold :] if self._hold else ""
        window = searched + self._pending
        cut = min((i for i in (window.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta = window[len(searched) : cut] if cut >= len(searched) else ""
            self.stopped, self._pending = True, ""
            self.text += delta
            return delta
        keep = 0 if final else min(self._hold, len(self._pending))
        delta = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        self.text += delta
        return delta
