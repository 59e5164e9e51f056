"""One request's grammar state: the mask of its next token, advanced by each token it samples."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import llguidance
import numpy as np

from minisgl_jax.grammar.vocab import GrammarVocab


class GrammarMatcher:
    """Where one request stands in its grammar; numpy only, one per request, not thread-safe.

    The request's EOS ids (the engine's choice: the model's EOS, and stop token ids if it likes)
    are allowed exactly when the grammar can end here; accepting one finishes the grammar, after
    which only they are allowed. llguidance's own EOS placeholder plays no part.
    """

    def __init__(self, ll: llguidance.LLMatcher, vocab: GrammarVocab, eos_token_ids: Iterable[int]) -> None:
        self._ll = ll
        self._vocab = vocab
        self._eos = sorted({t for t in eos_token_ids if 0 <= t < vocab.vocab_size})
        # llguidance fills rows of its own width; ours is narrower when the tokenizer outgrows the model.
        self._scratch = None if vocab.ll_mask_words == vocab.mask_words else np.empty(vocab.ll_mask_words, np.int32)
        self._ended_by_eos = False
        self._empty_mask = False
        self._error = ""

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask of the next token into `out`: int32[mask_words], bit j of
        word i is token 32 * i + j. A row of zeros means no token can follow (`is_dead`)."""
        if out.shape != (self._vocab.mask_words,) or out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"the mask row must be a contiguous int32[{self._vocab.mask_words}], "
                             f"got {out.dtype}{list(out.shape)}")
        if not self._ended_by_eos:
            target = out if self._scratch is None else self._scratch
            self._ll.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)
            if self._scratch is not None:
                out[:] = self._scratch[: out.shape[0]]
        self._finish_mask(out)

    def _finish_mask(self, out: np.ndarray) -> None:
        """llguidance's mask in `out` (unless EOS ended the grammar) -> the request's: its EOS ids
        where the grammar can end, llguidance's placeholder EOS never."""
        words = out.view(np.uint32)
        if self._ended_by_eos:
            out[:] = 0
        else:
            for token in self._vocab.ll_eos_ids:
                if token < self._vocab.vocab_size:
                    words[token >> 5] &= ~np.uint32(1 << (token & 31))
        if self._ended_by_eos or self._ll.is_accepting():
            for token in self._eos:
                words[token >> 5] |= np.uint32(1 << (token & 31))
        self._empty_mask = not out.any()

    def accept(self, token: int) -> bool:
        """Advance past `token`; False (and the matcher is dead) when the grammar did not allow it."""
        if token in self._eos:
            if self._ended_by_eos or not self._ll.is_accepting():
                self._error = f"token {token} (EOS) came before the grammar could end"
                return False
            self._ended_by_eos = True
            return True
        if self._ended_by_eos:
            self._error = f"token {token} came after EOS"
            return False
        return self._ll.consume_token(token)

    def rollback(self, num_tokens: int) -> None:
        """Take back the last `num_tokens` accepted tokens (a dead matcher stays dead)."""
        if num_tokens > 0 and self._ended_by_eos:
            self._ended_by_eos = False
            num_tokens -= 1
        if num_tokens > 0 and not self._ll.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._ll.get_error()}")

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: EOS was accepted, or nothing but EOS may follow; the engine may
        end the request here (finish reason "stop") without sampling the EOS."""
        return not (self._error or self._ll.is_error()) and (self._ended_by_eos or self._ll.is_stopped())

    @property
    def is_dead(self) -> bool:
        """No token can follow an unfinished grammar: a disallowed token was accepted, or the last
        mask was empty. The request must end, with `error` as the reason."""
        return bool(self._error) or self._ll.is_error() or (self._empty_mask and not self.is_finished)

    @property
    def error(self) -> str:
        """Why the matcher is dead, for the request's finish message; empty while it is not."""
        if self._error or self._ll.is_error():
            return self._error or self._ll.get_error()
        return "no token is allowed here" if self._empty_mask else ""


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool (80% of the cores, at most 32): masks of many rows at once, without the GIL."""
    return llguidance.LLExecutor()


def fill_masks(rows: Sequence[tuple[int, GrammarMatcher]], out: np.ndarray) -> None:
    """`matcher.fill_mask(out[row])` for each (row, matcher), llguidance's work spread over its threads:
    a batch of constrained requests costs the host about one mask's time per core, not per row.

    `out` is [rows, mask_words] int32, C-contiguous; the rows not named are left as they are.
    """
    if not rows:
        return
    vocab = rows[0][1]._vocab
    if out.ndim != 2 or out.shape[1] != vocab.mask_words or out.dtype != np.int32 or not out.flags["C_CONTIGUOUS"]:
        raise ValueError(f"the masks must be a contiguous int32[rows, {vocab.mask_words}], "
                         f"got {out.dtype}{list(out.shape)}")
    if vocab.ll_mask_words != vocab.mask_words:  # llguidance's rows are wider: one at a time, through scratch
        for row, matcher in rows:
            matcher.fill_mask(out[row])
        return
    live = [(matcher._ll, row) for row, matcher in rows if not matcher._ended_by_eos]
    if live:
        _executor().unsafe_compute_mask_ptr(live, out.ctypes.data, out.shape[1] * 4, out.shape[0])
    for row, matcher in rows:
        matcher._finish_mask(out[row])
