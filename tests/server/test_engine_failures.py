"""A failed step is an error for its own clients only; a broken engine stops the server, with an
error for every client and a non-zero exit. Faults come from faulty_server.py, by request seed."""

import os
import time

import httpx
import pytest
from faulty_server import DEVICE_ERROR_SEED, LATE_STEP_ERROR_SEED, STEP_ERROR_SEED
from server_process import BackgroundStream, ServerProcess

pytestmark = pytest.mark.slow  # a server of its own

COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def faulty_server(tiny_model_dir, compile_cache, tmp_path_factory):
    """Shared by this module's tests; the last one breaks it."""
    log = str(tmp_path_factory.mktemp("logs") / "faulty.log")
    script = os.path.join(os.path.dirname(__file__), "faulty_server.py")
    proc = ServerProcess(tiny_model_dir, log, script=script, compile_cache=compile_cache)
    proc.wait_ready()
    yield proc
    proc.stop()


def test_a_failed_step_is_a_500_for_its_request_while_another_completes(faulty_server):
    url = faulty_server.url
    other = BackgroundStream(url, {"prompt": "a longer one", "max_tokens": 48, "ignore_eos": True})
    assert other.started.wait(30)  # decoding: the failing request's prefill is a step of its own
    failed = httpx.post(url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 8, "seed": STEP_ERROR_SEED})
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "the engine failed while running this request" in error["message"]
    other.join(30)
    assert other.status == 200 and other.finish_reason == "length"
    faulty_server.wait_idle()  # the failed request's pages are back
    assert faulty_server.metric("minisgl_kv_invariant_ok") == 1
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 4}).status_code == 200
    logged = "a prefill step failed (ValueError: injected step error): its requests (1) end with an error"
    assert logged in faulty_server.logs()


def test_a_step_that_fails_mid_stream_ends_the_stream_with_an_error_event(faulty_server):
    stream = BackgroundStream(faulty_server.url, {"prompt": "hi", "max_tokens": 32, "ignore_eos": True,
                                                  "seed": LATE_STEP_ERROR_SEED})
    events = stream.join(30)
    assert stream.status == 200 and events[0]["choices"]  # it had begun
    assert events[-1]["error"]["code"] == 500 and "the engine failed" in events[-1]["error"]["message"]
    assert stream.finish_reason is None  # it never finished as if it had succeeded
    faulty_server.wait_idle()


def test_a_device_error_stops_the_server_within_10s_with_an_error_for_every_client(faulty_server):
    url = faulty_server.url
    other = BackgroundStream(url, {"prompt": "a longer one", "max_tokens": 400, "ignore_eos": True})
    assert other.started.wait(30)
    sent = time.monotonic()
    failed = httpx.post(url + COMPLETIONS, json={"prompt": "hi", "seed": DEVICE_ERROR_SEED}, timeout=15)
    assert failed.status_code == 500, failed.text
    assert "the scheduler process exited with code 1" in failed.json()["error"]["message"]
    other.join(10)
    assert other.events[-1]["error"]["code"] == 500 and other.finish_reason is None
    assert faulty_server.proc.wait(max(0.1, 10 - (time.monotonic() - sent))) == 1
    logs = faulty_server.logs()
    assert "the engine is broken (a device error in a prefill step: INTERNAL: injected device error)" in logs
    assert "the scheduler process exited with code 1" in logs
