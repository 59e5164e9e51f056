"""The scheduler's stall reporter: a step that hangs past the watchdog timeout is logged with its stack."""

import logging
import tempfile
import threading
import time

from minisgl_jax.server import ipc
from minisgl_jax.server.scheduler_worker import SchedulerWorker


class HangingEngine:
    """Has work, and its step blocks until released: the stall the watchdog exists for."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def has_unfinished(self) -> bool:
        return not self.release.is_set()

    def step(self) -> list:
        self.release.wait(10)
        return []

    def stats(self) -> dict:
        return {"steps": 1}

    timing = {"step_s": 0.0, "wait_s": 0.0}

    def shutdown(self) -> None:
        pass


def test_a_hung_step_is_logged_with_where_the_loop_is(caplog):
    engine = HangingEngine()
    worker = SchedulerWorker(ipc.RunDir(tempfile.mkdtemp(prefix="minisgl-test-")), engine, watchdog_timeout_s=0.4)
    worker._maybe_heartbeat = lambda: None  # no API process listens in this test
    loop = threading.Thread(target=worker.serve_forever)
    with caplog.at_level(logging.ERROR, logger="minisgl_jax.server.scheduler_worker"):
        loop.start()
        deadline = time.monotonic() + 5
        while "no step finished" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.stopping = True
        engine.release.set()
        loop.join(5)
    assert "work queued but no step finished" in caplog.text
    assert "in step" in caplog.text and "release.wait" in caplog.text  # the stack names the hung call
    assert caplog.text.count("no step finished") == 1  # once per stall, not once per second
