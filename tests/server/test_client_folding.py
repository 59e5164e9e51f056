"""Chunks of a choice that pile up for a slow reader reach it joined, in order, with nothing lost."""

import asyncio
import tempfile

import zmq

from minisgl_jax.server import ipc
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.messages import GenerateReq, TextBatch, TextChunk
from minisgl_jax.server.metrics import ServerMetrics


def chunk(rid: str, i: int, last: bool = False) -> TextChunk:
    return TextChunk(rid, str(i), [i], last, "length" if last else None, [], 5, i + 1, 0)


def test_queued_chunks_of_a_choice_are_joined_and_other_choices_kept_apart():
    run_dir = ipc.RunDir(tempfile.mkdtemp(prefix="minisgl-test-"))
    tokenizer = ipc.bind_inbox(zmq.Context.instance(), run_dir, "tokenizer")  # takes the GenerateReq

    async def read_all() -> list[TextChunk]:
        client = EngineClient(run_dir, ServerMetrics())
        stream = client.generate(GenerateReq("r", prompts=["x"], params={}, n=2), 2)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)  # the request is out; the reader now waits for its first chunk
        for message in (chunk("r/0", 0), chunk("r/0", 1), chunk("r/1", 7), chunk("r/0", 2, last=True),
                        chunk("r/1", 8, last=True)):
            client.dispatch(TextBatch([message]))
        return [await first] + [c async for c in stream]

    try:
        got = asyncio.run(read_all())
    finally:
        tokenizer.close(linger=0)
    assert [(c.rid, c.text, c.token_ids, c.finished) for c in got] == [
        ("r/0", "01", [0, 1], False),  # joined
        ("r/1", "7", [7], False),  # another choice in between: kept apart, order kept
        ("r/0", "2", [2], True),
        ("r/1", "8", [8], True),
    ]
    assert got[0].completion_tokens == 2 and got[3].finish_reason == "length"
