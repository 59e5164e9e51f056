"""The API process's side of the sockets: send requests, route every reply to the request awaiting it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio
from minisgl_jax.server import ipc, messages
from minisgl_jax.server.messages import (
    AbortReq,
    ErrorReply,
    FlushCacheReply,
    GenerateReq,
    SchedulerReady,
    SchedulerStats,
    TextBatch,
    TextChunk,
    TokenizeReply,
)
from minisgl_jax.server.metrics import ServerMetrics
from minisgl_jax.server.protocol import APIError

from minisgl_jax.core import FinishReason

logger = logging.getLogger(__name__)

STEP_FAILED = ("the engine failed while running this request and ended it; other requests go on "
               "(the server log has the details)")


class EngineClient:
    """Owns the API's inbox and the outbox to the tokenizer; one asyncio queue per live request."""

    def __init__(self, run_dir: ipc.RunDir, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.inbox = ipc.bind_inbox(zmq.asyncio.Context.instance(), run_dir, "api")
        self.to_tokenizer = ipc.connect_outbox(zmq.Context.instance(), run_dir, "tokenizer")
        self.queues: dict[str, asyncio.Queue] = {}
        self.ready: SchedulerReady | None = None
        self.stats: SchedulerStats | None = None
        self.stats_at = 0.0  # monotonic time of the last heartbeat

    async def receive_forever(self) -> None:
        while True:
            data = await self.inbox.recv()
            try:
                self.dispatch(messages.decode(data))
            except messages.MessageError as err:
                logger.warning("api: dropped a malformed message (%d bytes): %s", len(data), err)

    def dispatch(self, message: Any) -> None:
        if isinstance(message, TextBatch):
            for chunk in message.chunks:
                self._deliver(chunk.rid.rsplit("/", 1)[0], chunk)
        elif isinstance(message, ErrorReply | TokenizeReply | FlushCacheReply):
            self._deliver(message.rid, message)
        elif isinstance(message, SchedulerStats):
            self.stats, self.stats_at = message, time.monotonic()
            self.metrics.update(message)
        elif isinstance(message, SchedulerReady):
            self.ready, self.stats_at = message, time.monotonic()
        else:
            logger.warning("api: dropped an unexpected %s", type(message).__name__)

    def _deliver(self, rid: str, message: Any) -> None:
        queue = self.queues.get(rid)
        if queue is not None:  # else the request has already ended (aborted, or refused)
            queue.put_nowait(message)

    def send(self, message: Any) -> None:
        ipc.send(self.to_tokenizer, message)

    def fail_all(self, status: int, message: str) -> None:
        """End every request that awaits a reply with this error: the scheduler is gone, or the
        server stops before they finished."""
        for rid, queue in self.queues.items():
            queue.put_nowait(ErrorReply(rid, message, None, status))

    async def call(self, rid: str, message: Any) -> Any:
        """Send a request with a single reply (tokenize, flush) and await that reply."""
        self.queues[rid] = queue = asyncio.Queue()
        try:
            self.send(message)
            reply = await queue.get()
        finally:
            del self.queues[rid]
        if isinstance(reply, ErrorReply):
            raise APIError(reply.status, reply.message, reply.param)
        return reply

    async def generate(self, req: GenerateReq, num_choices: int) -> AsyncIterator[TextChunk]:
        """The request's text chunks until every choice has finished.

        Leaving early (the client went away, or an error) aborts every unfinished choice, so
        their KV pages return at once.
        """
        self.queues[req.rid] = queue = asyncio.Queue()
        unfinished = set(range(num_choices))
        arrival = time.monotonic()
        last_token: dict[int, float] = {}
        pending = None  # a message taken off the queue while folding, not yet handled
        try:
            self.send(req)
            while unfinished:
                item, pending = pending or await queue.get(), None
                # A client that reads slower than tokens come gets what has piled up as one chunk.
                while isinstance(item, TextChunk) and not item.finished and not queue.empty():
                    following = queue.get_nowait()
                    if isinstance(following, TextChunk) and following.rid == item.rid:
                        item = joined(item, following)
                    else:
                        pending = following
                        break
                if isinstance(item, ErrorReply):
                    raise APIError(item.status, item.message, item.param)
                index = int(item.rid.rsplit("/", 1)[1])
                if item.finish_reason == FinishReason.ERROR.value:
                    unfinished.discard(index)  # the engine has ended it already
                    if item.error_field:  # the request's own fault: its grammar failed to compile or ran dry
                        raise APIError(400, item.error, item.error_field)
                    raise APIError(500, STEP_FAILED)  # its step failed in the engine
                self._observe(item, index, arrival, last_token)
                if item.finished:
                    unfinished.discard(index)
                yield item
        finally:
            del self.queues[req.rid]
            if unfinished:
                self.send(AbortReq([f"{req.rid}/{i}" for i in sorted(unfinished)]))

    def _observe(self, chunk: TextChunk, index: int, arrival: float, last_token: dict[int, float]) -> None:
        now = time.monotonic()
        count = len(chunk.token_ids)
        if count:
            if index not in last_token:
                self.metrics.ttft.observe(now - arrival)
                count -= 1
            for _ in range(count):
                self.metrics.itl.observe((now - last_token.get(index, now)) / max(1, len(chunk.token_ids)))
            last_token[index] = now
            self.metrics.generation_tokens.inc(len(chunk.token_ids))
        if chunk.finished:
            self.metrics.requests.labels(chunk.finish_reason or "unknown").inc()
            self.metrics.e2e.observe(now - arrival)
            self.metrics.prompt_tokens.inc(chunk.prompt_tokens)
            self.metrics.cached_tokens.inc(chunk.cached_tokens)


def joined(first: TextChunk, then: TextChunk) -> TextChunk:
    """Two consecutive chunks of one choice as one."""
    return TextChunk(
        first.rid, first.text + then.text, first.token_ids + then.token_ids, then.finished, then.finish_reason,
        first.logprobs + then.logprobs, then.prompt_tokens, then.completion_tokens, then.cached_tokens,
        then.error, then.error_field,
    )
