"""Start-up, API key, shutdown (a drain), and the death of a child or of the API process itself."""

import os
import signal
import time

import httpx
import openai
import pytest
from server_process import BackgroundStream, ServerProcess, child_pids, is_running

pytestmark = pytest.mark.slow  # servers of its own


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if is_running(p)]


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, compile_cache, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "keyed.log")
    # The variants' background compiler runs here: SIGTERM must still stop everything within 10 s.
    proc = ServerProcess(tiny_model_dir, log, "--api-key", "sesame", "--served-model-name", "tiny",
                         "--shutdown-timeout", "20", compile_cache=compile_cache, background_compile=True)
    yield proc
    proc.stop()


def test_health_is_503_until_the_model_is_loaded_and_compiled_then_serves(keyed_server):
    keyed_server.wait_listening()  # /health/live: the API process answers at once
    auth = {"Authorization": "Bearer sesame"}
    health = httpx.get(keyed_server.url + "/health")
    early = httpx.post(keyed_server.url + "/v1/completions", json={"prompt": "x"}, headers=auth)
    assert health.status_code == 503 and "loading" in health.json()["reason"]
    assert httpx.get(keyed_server.url + "/health/ready").json() == health.json()
    assert early.status_code == 503 and early.json()["error"]["type"] == "service_unavailable"
    keyed_server.wait_ready()
    assert httpx.post(keyed_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      headers=auth).status_code == 200


def test_api_key_required_except_on_health_and_metrics(keyed_server):
    keyed_server.wait_ready()
    url = keyed_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        response = httpx.post(url + "/v1/chat/completions", json={"messages": []}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    for path in ("/health", "/health/ready", "/health/live", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.model == "tiny" and out.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_sigterm_drains_then_stops_the_server_and_every_child_within_10s(keyed_server):
    """While it drains, new requests get 503 and the one in flight finishes; then the server exits 0.
    The scheduler is stopped for the first checks, so that the request is surely still in flight."""
    keyed_server.wait_ready()
    url, auth = keyed_server.url, {"Authorization": "Bearer sesame"}
    children = child_pids(keyed_server.proc.pid)
    assert len(children) >= 3  # tokenizer, detokenizer, scheduler (and multiprocessing's resource tracker)
    scheduler = keyed_server.child("scheduler")
    os.kill(scheduler, signal.SIGSTOP)  # first: the request below cannot finish before the SIGTERM
    try:
        in_flight = BackgroundStream(url, {"prompt": "x", "max_tokens": 100, "ignore_eos": True}, auth)
        time.sleep(1.5)  # it reaches the API, which holds it until its first token
        started = time.monotonic()
        keyed_server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the API handles the signal
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
        health = httpx.get(url + "/health")
        assert in_flight.thread.is_alive()
    finally:
        os.kill(scheduler, signal.SIGCONT)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["reason"] == "the server is shutting down"
    in_flight.join(10)
    assert in_flight.status == 200 and in_flight.finish_reason == "length"
    assert keyed_server.proc.wait(10) == 0
    assert wait_gone(children, 10 - (time.monotonic() - started)) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_a_dead_scheduler_takes_the_server_down_with_a_clear_error(tiny_model_dir, compile_cache, tmp_path):
    server = ServerProcess(tiny_model_dir, str(tmp_path / "crash.log"), compile_cache=compile_cache)
    try:
        server.wait_ready()
        children = child_pids(server.proc.pid)
        os.kill(server.child("scheduler"), signal.SIGKILL)
        assert server.proc.wait(10) == 1
        assert "the scheduler process was killed by signal 9" in server.logs()
        assert wait_gone(children, 5) == []
    finally:
        server.stop()


def test_sigkill_of_the_api_process_leaves_no_child_within_10s(tiny_model_dir, tmp_path):
    server = ServerProcess(tiny_model_dir, str(tmp_path / "killed.log"))
    try:
        server.wait_listening()  # its children have started; some may still be importing
        children = child_pids(server.proc.pid)
        assert len(children) >= 3
        server.proc.kill()
        assert wait_gone(children, 10) == []
    finally:
        server.stop()
