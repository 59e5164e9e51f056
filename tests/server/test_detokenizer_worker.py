"""One request whose tokens cannot be detokenized fails alone: a 500 for it, text for the others."""

import tempfile

import zmq

from minisgl_jax.server import ipc
from minisgl_jax.server import messages as m
from minisgl_jax.server.detokenizer_worker import DetokenizerWorker
from minisgl_jax.tokenizer import byte_level_tokenizer

WEIRD_TOKEN = 300


class FailsOnOneToken:
    """The fallback tokenizer, except that decoding WEIRD_TOKEN raises (as a broken vocabulary might)."""

    def __init__(self) -> None:
        self.inner = byte_level_tokenizer(320)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids, *args, **kwargs):
        if WEIRD_TOKEN in list(ids):
            raise ValueError(f"no text for token {WEIRD_TOKEN}")
        return self.inner.decode(ids, *args, **kwargs)

    def convert_ids_to_tokens(self, ids, *args, **kwargs):
        if WEIRD_TOKEN in (ids if isinstance(ids, list) else [ids]):
            raise ValueError(f"no text for token {WEIRD_TOKEN}")
        return self.inner.convert_ids_to_tokens(ids, *args, **kwargs)


def step(rid: str, token: int, finished: bool = False) -> m.StepTokens:
    return m.StepTokens(rid, [token], finished, "length" if finished else None, [], 3, 1, 0)


def test_a_request_that_fails_to_detokenize_gets_a_500_and_the_others_go_on():
    run_dir = ipc.RunDir(tempfile.mkdtemp(prefix="minisgl-test-"))
    context = zmq.Context()
    api = ipc.bind_inbox(context, run_dir, "api")
    scheduler = ipc.bind_inbox(context, run_dir, "scheduler")
    try:
        worker = DetokenizerWorker(run_dir, FailsOnOneToken())
        for rid in ("bad/0", "good/0"):
            worker.handle(m.DetokInit(rid, [], [], True, False))
        worker.handle(m.TokenBatch([step("bad/0", WEIRD_TOKEN), step("good/0", 104)]))
        worker.handle(m.TokenBatch([step("bad/0", 105, finished=True), step("good/0", 105, finished=True)]))

        to_api = ipc.receive_all(api, 2000)
        while len(to_api) < 3:
            more = ipc.receive_all(api, 2000)
            assert more, f"the API got only {to_api}"
            to_api += more
        errors = [x for x in to_api if isinstance(x, m.ErrorReply)]
        texts = [c for x in to_api if isinstance(x, m.TextBatch) for c in x.chunks]
        assert [(e.rid, e.status) for e in errors] == [("bad", 500)]
        assert "detokenization failed" in errors[0].message
        assert [c.rid for c in texts] == ["good/0", "good/0"] and texts[-1].finished
        assert "".join(c.text for c in texts) == "hi"
        assert ipc.receive_all(scheduler, 2000) == [m.AbortReq(["bad/0"])]  # its pages return at once
    finally:
        context.destroy(linger=0)


def test_a_burst_past_a_stop_string_reports_only_the_tokens_up_to_it():
    """A decode burst brings several tokens at once; those after the stop string's last one are not
    the completion's (token ids and usage as single steps would give), and the request is aborted."""
    run_dir = ipc.RunDir(tempfile.mkdtemp(prefix="minisgl-test-"))
    context = zmq.Context()
    api = ipc.bind_inbox(context, run_dir, "api")
    scheduler = ipc.bind_inbox(context, run_dir, "scheduler")
    try:
        worker = DetokenizerWorker(run_dir, byte_level_tokenizer(320))
        worker.handle(m.DetokInit("r/0", [], ["cd"], True, False))
        burst = [ord(c) for c in "abcdef"]
        worker.handle(m.TokenBatch([m.StepTokens("r/0", burst, False, None, [], 3, 7, 0)]))
        (reply,) = ipc.receive_all(api, 2000)
        (chunk,) = reply.chunks
        assert (chunk.text, chunk.token_ids, chunk.finished, chunk.finish_reason) == ("ab", burst[:4], True, "stop")
        assert chunk.completion_tokens == 7 - 2  # the two tokens after "cd" are not counted
        assert ipc.receive_all(scheduler, 2000) == [m.AbortReq(["r/0"])]
    finally:
        context.destroy(linger=0)
