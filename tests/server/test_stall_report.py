"""The scheduler's heartbeat thread: it beats through a hung step, and logs the hung step with its stack."""

import logging
import tempfile
import threading
import time

import zmq
from minisgl_jax.server import ipc, messages
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
        names = ("num_running", "num_waiting", "kv_pages_total", "kv_pages_free", "kv_pages_cached", "cache_hit_tokens",
                 "prompt_tokens", "generation_tokens", "num_retractions", "num_evicted_pages", "steps")
        return dict.fromkeys(names, 1)

    def check_kv_invariant(self) -> None:
        pass

    compiling = False
    timing = {"step_s": 0.0, "wait_s": 0.0}

    def shutdown(self) -> None:
        pass


def test_a_hung_step_is_logged_with_where_the_loop_is_and_the_heartbeat_goes_on(caplog):
    engine = HangingEngine()
    run_dir = ipc.RunDir(tempfile.mkdtemp(prefix="minisgl-test-"))
    api = ipc.bind_inbox(zmq.Context.instance(), run_dir, "api")  # stands in for the API process
    worker = SchedulerWorker(run_dir, engine, watchdog_timeout_s=1.0)
    loop = threading.Thread(target=worker.serve_forever)
    with caplog.at_level(logging.ERROR, logger="minisgl_jax.server.scheduler_worker"):
        loop.start()
        deadline = time.monotonic() + 5
        beats = []
        # Until the stall is logged and a beat has told of more than a second in the step (the beat
        # and the log come from different threads, in either order).
        while time.monotonic() < deadline and not (
                "no progress" in caplog.text and beats and beats[-1].busy_s > 1.0):
            time.sleep(0.05)
            beats += [m for m in ipc.receive_all(api, timeout_ms=0) if isinstance(m, messages.SchedulerStats)]
        worker.stopping = True
        engine.release.set()
        loop.join(5)
    api.close()
    assert "no progress for" in caplog.text and "in a step or a message" in caplog.text
    assert "in step" in caplog.text and "release.wait" in caplog.text  # the stack names the hung call
    assert caplog.text.count("no progress") == 1  # once per stall, not once per second
    # The heartbeat came while the step hung, saying how long it had run.
    assert len(beats) >= 2 and beats[-1].has_work and beats[-1].busy_s > 1.0 and not beats[-1].compiling
