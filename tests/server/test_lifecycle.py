"""Start-up, API key, shutdown and child death of a real server process."""

import os
import signal
import time

import httpx
import openai
import pytest
from server_process import ServerProcess, child_pids, is_running


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
                         compile_cache=compile_cache, background_compile=True)
    yield proc
    proc.stop()


def test_503_until_ready_then_serves(keyed_server):
    keyed_server.wait_listening()
    auth = {"Authorization": "Bearer sesame"}
    early = httpx.post(keyed_server.url + "/v1/completions", json={"prompt": "x"}, headers=auth)
    ready = httpx.get(keyed_server.url + "/health/ready")
    if ready.status_code == 503:  # still compiling: generation is refused the same way
        assert early.status_code == 503 and early.json()["error"]["type"] == "service_unavailable"
        assert "loading" in ready.json()["reason"]
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
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.model == "tiny" and out.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_sigterm_stops_the_server_and_every_child_within_10s(keyed_server):
    keyed_server.wait_ready()
    children = child_pids(keyed_server.proc.pid)
    assert len(children) >= 3  # tokenizer, detokenizer, scheduler (and multiprocessing's resource tracker)
    started = time.monotonic()
    keyed_server.proc.send_signal(signal.SIGTERM)
    assert keyed_server.proc.wait(10) == 0
    assert wait_gone(children, 10 - (time.monotonic() - started)) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(keyed_server.url + "/health", timeout=2)


def test_a_dead_scheduler_takes_the_server_down_with_a_clear_error(tiny_model_dir, compile_cache, tmp_path):
    server = ServerProcess(tiny_model_dir, str(tmp_path / "crash.log"), compile_cache=compile_cache)
    try:
        server.wait_ready()
        children = child_pids(server.proc.pid)
        scheduler = [p for p in children if _process_name(p) == "minisgl-schedul"]  # ps shows the role
        assert len(scheduler) == 1
        os.kill(scheduler[0], signal.SIGKILL)
        assert server.proc.wait(10) == 1
        assert "the scheduler process was killed by signal 9" in server.logs()
        assert wait_gone(children, 5) == []
    finally:
        server.stop()


def _process_name(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
