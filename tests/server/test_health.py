"""/health answers 200 only when a request would be served now, else 503 with the reason;
/health/ready is the same check and /health/live only says that the API process answers."""

import dataclasses
import os
import shutil
import signal
import tempfile
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from minisgl_jax.server import ipc
from minisgl_jax.server.api import APIConfig, build_app
from minisgl_jax.server.health import HEARTBEAT_TIMEOUT_S
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.messages import SchedulerReady, SchedulerStats
from minisgl_jax.server.metrics import ServerMetrics
from server_process import BackgroundStream

WATCHDOG_S = 30.0
READY = SchedulerReady(weights_bytes=1, kv_pages=95, kv_tokens=1520, page_size=16, max_running_requests=4,
                       max_model_len=512, startup_seconds=1.0)
BEAT = SchedulerStats(num_running=1, num_waiting=0, kv_pages_total=95, kv_pages_free=90, kv_pages_cached=0,
                      cache_hit_tokens=0, prompt_tokens=3, generation_tokens=5, num_retractions=0, num_evicted_pages=0,
                      busy_s=0.01, has_work=True, kv_invariant_ok=True, compiling=False)


class API:
    """The app over an EngineClient with no worker behind it: the test plays the scheduler and the launcher."""

    def __init__(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="minisgl-")  # short: ipc socket paths are limited to ~100 bytes
        self.engine = EngineClient(ipc.RunDir(self.run_dir), ServerMetrics())
        self.problem: str | None = None
        config = APIConfig(served_model_name="m", watchdog_timeout_s=WATCHDOG_S, launcher_problem=lambda: self.problem)
        self.http = TestClient(build_app(self.engine, config))

    def beat(self, age_s: float = 0.0, **fields) -> None:
        """A heartbeat `age_s` seconds ago."""
        self.engine.dispatch(dataclasses.replace(BEAT, **fields))
        self.engine.stats_at -= age_s

    def health(self) -> tuple[int, str | None]:
        """/health's status and reason, after checking that /health/ready says the same."""
        response = self.http.get("/health")
        assert self.http.get("/health/ready").json() == response.json()
        return response.status_code, response.json().get("reason")

    def close(self) -> None:
        self.engine.inbox.close()
        self.engine.to_tokenizer.close()
        shutil.rmtree(self.run_dir)


@pytest.fixture
def api():
    api = API()
    yield api
    api.close()


def test_loading_is_503_for_health_and_for_requests_but_live_is_200(api):
    assert api.health() == (503, "the model is still loading and compiling")
    assert api.http.get("/health/live").status_code == 200
    refused = api.http.post("/v1/completions", json={"prompt": "x"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    assert "loading" in refused.json()["error"]["message"]


def test_loaded_with_a_fresh_heartbeat_is_200(api):
    api.engine.dispatch(READY)
    api.beat()
    assert api.health() == (200, None)


def test_a_silent_scheduler_is_503_once_its_heartbeat_is_overdue(api):
    api.engine.dispatch(READY)
    api.beat(age_s=HEARTBEAT_TIMEOUT_S - 1)
    assert api.health()[0] == 200
    api.beat(age_s=HEARTBEAT_TIMEOUT_S + 1)
    status, reason = api.health()
    assert status == 503 and "no heartbeat for 11s" in reason and "stopped or hung" in reason
    assert HEARTBEAT_TIMEOUT_S < 15  # a stopped scheduler shows within 15 s
    assert api.http.get("/health/live").status_code == 200


def test_a_pass_past_the_watchdog_is_503_and_a_long_compile_says_so(api):
    api.engine.dispatch(READY)
    api.beat(busy_s=WATCHDOG_S - 1, compiling=True)
    assert api.health() == (200, None)  # a compile within the watchdog is no fault
    api.beat(busy_s=WATCHDOG_S + 1)
    status, reason = api.health()
    assert status == 503 and "made no progress for 31s" in reason and "--watchdog-timeout 30s" in reason
    api.beat(busy_s=WATCHDOG_S + 1, compiling=True)
    status, reason = api.health()
    assert status == 503 and "waited for a step program to compile for 31s" in reason
    api.beat()
    assert api.health() == (200, None)  # progress again


def test_the_launchers_problem_is_503(api):
    api.engine.dispatch(READY)
    api.beat()
    api.problem = "the server is shutting down"
    assert api.health() == (503, "the server is shutting down")


def test_a_stopped_scheduler_fails_health_within_15s_and_its_held_request_finishes_after_it_resumes(server):
    """SIGSTOP freezes the scheduler's heartbeat thread too: /health turns 503, new requests are
    refused, the request in flight is held; after SIGCONT /health is 200 and the request finishes."""
    url, scheduler = server.url, server.child("scheduler")
    held = BackgroundStream(url, {"prompt": "x", "max_tokens": 200, "ignore_eos": True})
    assert held.started.wait(30)
    os.kill(scheduler, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while (health := httpx.get(url + "/health")).status_code == 200 and time.monotonic() - stopped < 15:
            time.sleep(0.2)
        assert health.status_code == 503 and "no heartbeat" in health.json()["reason"]
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert held.thread.is_alive()
    finally:
        resumed = time.monotonic()
        os.kill(scheduler, signal.SIGCONT)
    while httpx.get(url + "/health").status_code != 200 and time.monotonic() - resumed < 5:
        time.sleep(0.1)
    assert httpx.get(url + "/health").status_code == 200
    held.join(30)
    assert held.status == 200 and held.finish_reason == "length" and held.ended_at > resumed
