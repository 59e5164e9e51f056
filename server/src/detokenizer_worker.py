"""The detokenizer process: token ids to text deltas, stop strings, and logprob token strings.

A stop string ends the request here: the client gets its final chunk at once, and the scheduler
an abort so the request's pages return; the scheduler's own final output for it is then dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
from minisgl_jax.server import ipc
from minisgl_jax.server.messages import (
    AbortReq,
    DetokInit,
    ErrorReply,
    StepTokens,
    TextBatch,
    TextChunk,
    TokenBatch,
    TokenLogprobText,
    TopLogprob,
)
from transformers import PreTrainedTokenizerBase

from minisgl_jax.detokenizer import IncrementalDetokenizer
from minisgl_jax.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class DetokenizerWorker:
    def __init__(self, run_dir: ipc.RunDir, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        context = zmq.Context()
        self.inbox = ipc.bind_inbox(context, run_dir, "detokenizer")
        self.to_api = ipc.connect_outbox(context, run_dir, "api")
        self.to_scheduler = ipc.connect_outbox(context, run_dir, "scheduler")
        self.live: dict[str, tuple[IncrementalDetokenizer, bool]] = {}
        self.ended_here: set[str] = set()  # stopped by a stop string; the scheduler's final is dropped
        self.echoes: dict[str, str] = {}  # prompt text to put before a request's first chunk (echo)

    def serve_forever(self) -> None:
        while True:
            for message in ipc.receive_all(self.inbox, timeout_ms=1000):
                self.handle(message)

    def handle(self, message: Any) -> None:
        if isinstance(message, DetokInit):
            detok = IncrementalDetokenizer(self.tokenizer, message.prompt_tail, message.skip_special_tokens, message.stop)
            self.live[message.rid] = (detok, message.logprobs)
            if message.echo_text is not None:
                self.echoes[message.rid] = message.echo_text
        elif isinstance(message, TokenBatch):
            chunks = [c for c in (self._chunk(out) for out in message.outputs) if c is not None]
            if chunks:
                ipc.send(self.to_api, TextBatch(chunks))
        else:
            logger.warning("detokenizer: dropped an unexpected %s", type(message).__name__)

    def _chunk(self, out: StepTokens) -> TextChunk | None:
        if out.rid in self.ended_here:
            if out.finished:
                self.ended_here.discard(out.rid)
            return None
        if out.rid not in self.live:
            logger.warning("detokenizer: tokens for unknown request %s dropped", out.rid)
            return None
        try:
            return self._detokenize(out)
        except Exception as err:  # one request's failure must not stop the others
            logger.exception("detokenizer: request %s failed", out.rid)
            self.live.pop(out.rid, None)
            self.echoes.pop(out.rid, None)
            if not out.finished:
                self.ended_here.add(out.rid)
                ipc.send(self.to_scheduler, AbortReq([out.rid]))
            ipc.send(self.to_api, ErrorReply(out.rid.rsplit("/", 1)[0], f"detokenization failed: {err}", None, 500))
            return None

    def _detokenize(self, out: StepTokens) -> TextChunk:
        detok, with_logprobs = self.live[out.rid]
        text, used = detok.add_until_stop(out.token_ids)
        dropped = len(out.token_ids) - used  # a burst's tokens after a stop string
        finished, reason = out.finished, out.finish_reason
        if detok.stopped:
            reason = "stop"
            if not finished:
                finished = True
                self.ended_here.add(out.rid)
                ipc.send(self.to_scheduler, AbortReq([out.rid]))
        elif finished:
            text += detok.flush()
        if finished:
            del self.live[out.rid]
        logprobs = [self._logprob(entry) for entry in out.logprobs[:used]] if with_logprobs else []
        if out.rid in self.echoes:
            text = self.echoes.pop(out.rid) + text
            logprobs = [self._logprob(entry) for entry in out.prompt_logprobs or []] + logprobs
        return TextChunk(
            out.rid, text, out.token_ids[:used], finished, reason, logprobs,
            out.prompt_tokens, out.completion_tokens - dropped, out.cached_tokens, out.error, out.error_field,
        )

    def _logprob(self, entry: list[Any]) -> TokenLogprobText:
        token_id, logprob, top = entry
        return TokenLogprobText(
            self.tokenizer.decode([token_id]), int(token_id), None if logprob is None else float(logprob),
            [TopLogprob(self.tokenizer.decode([t]), int(t), float(lp)) for t, lp in top],
        )


def run_detokenizer(run_dir: str, tokenizer_path: str, local_only: bool, vocab_size: int) -> None:
    tokenizer = load_tokenizer(tokenizer_path, local_only=local_only, vocab_size=vocab_size)
    DetokenizerWorker(ipc.RunDir(run_dir), tokenizer).serve_forever()
