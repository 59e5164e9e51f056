"""The msgpack wire format between the server's processes: round trips and schema checks."""

import msgpack
import pytest

from minisgl_jax.server import messages as m

SAMPLES = [
    m.GenerateReq("r1", prompts=["text", [1, 2, 3]], params={"temperature": 0.5, "stop": ["x"]}, n=2),
    m.GenerateReq("r2", messages=[{"role": "user", "content": "hi"}], chat_template_kwargs={"enable_thinking": False}),
    m.AddReq("r1", [m.NewRequest("r1/0", [1, 2], {"seed": 3}), m.NewRequest("r1/1", [1, 2], {"seed": 4})]),
    m.AbortReq(["r1/0", "r1/1"]),
    m.DetokInit("r1/0", [7, 8], ["stop"], True, False),
    m.TokenBatch([m.StepTokens("r1/0", [5], False, None, [[5, -0.5, [[5, -0.5], [6, -1.0]]]], 2, 1, 0)]),
    m.TextBatch([m.TextChunk("r1/0", "é", [5], True, "stop",
                             [m.TokenLogprobText("é", 5, -0.5, [m.TopLogprob("a", 6, -1.0)])], 2, 1, 0)]),
    m.ErrorReply("r1", "too long", "max_tokens"),
    m.SchedulerReady(10, 20, 320, 16, 4, 512, 1.5),
    m.SchedulerStats(1, 2, 100, 50, 10, 7, 70, 30, 0, 3, 0.25, True, True, False),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(message):
    assert m.decode(m.encode(message)) == message


@pytest.mark.parametrize("data,words", [
    (b"\xc1\xc1 not msgpack", "not msgpack"),
    (msgpack.packb([1, 2]), "not a known message type"),
    (msgpack.packb({"type": "Pickle", "payload": b"x"}), "not a known message type"),
    (msgpack.packb({"type": [1, 2]}), "not a known message type"),
    (msgpack.packb({"type": "TextBatch", "chunks": [{"type": {"a": 1}}]}), "not a known message type"),
    (msgpack.packb({"type": "AbortReq"}), "lacks field 'rids'"),
    (msgpack.packb({"type": "AbortReq", "rids": ["a"], "extra": 1}), "unknown fields ['extra']"),
    (msgpack.packb({"type": "AbortReq", "rids": "a"}), "expected a list"),
    (msgpack.packb({"type": "AbortReq", "rids": [1]}), "expected str"),
    (msgpack.packb({"type": "FlushCacheReply", "rid": "a", "pages": True}), "got bool"),
    (msgpack.packb({"type": "TextBatch", "chunks": [{"type": "AbortReq", "rids": []}]}), "expected TextChunk, got AbortReq"),
])
def test_malformed_messages_are_refused_with_a_reason(data, words):
    with pytest.raises(m.MessageError) as err:
        m.decode(data)
    assert words in str(err.value)
