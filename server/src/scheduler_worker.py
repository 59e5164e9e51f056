"""The scheduler process: owns the Engine (every local GPU) and steps it while there is work.

Between steps it drains its inbox without blocking; idle, it waits on the inbox. Twice a second
it sends the API a heartbeat with the queue and KV figures, which the readiness check and the
Prometheus gauges read.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import traceback
from typing import Any

import zmq
from minisgl_jax.server import ipc
from minisgl_jax.server.messages import (
    AbortReq,
    AddReq,
    DetokInit,
    ErrorReply,
    FlushCacheReply,
    FlushCacheReq,
    SchedulerReady,
    SchedulerStats,
    StepTokens,
    TokenBatch,
)

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
IDLE_POLL_MS = 50


class SchedulerWorker:
    def __init__(self, run_dir: ipc.RunDir, engine: Any, watchdog_timeout_s: float = 120.0) -> None:
        self.engine = engine
        self.watchdog_timeout_s = watchdog_timeout_s
        context = zmq.Context()
        self.inbox = ipc.bind_inbox(context, run_dir, "scheduler")
        self.to_detokenizer = ipc.connect_outbox(context, run_dir, "detokenizer")
        self.to_api = ipc.connect_outbox(context, run_dir, "api")
        self.stopping = False
        self.busy = False
        self._last_step = time.monotonic()
        self._last_heartbeat = 0.0

    def serve_forever(self) -> None:
        threading.Thread(target=self._report_stalls, args=(threading.get_ident(),), daemon=True,
                         name="stall-reporter").start()
        while not self.stopping:
            self.busy = busy = self.engine.has_unfinished()
            for message in ipc.receive_all(self.inbox, timeout_ms=0 if busy else IDLE_POLL_MS):
                self.handle(message)
            if self.engine.has_unfinished():
                self._step()
            else:
                self._last_step = time.monotonic()
            self._maybe_heartbeat()
        steps, timing = self.engine.stats()["steps"], self.engine.timing
        logger.info("scheduler stopping after %d steps: %.2f ms host and %.2f ms waiting for the device per step",
                    steps, 1e3 * (timing["step_s"] - timing["wait_s"]) / max(1, steps),
                    1e3 * timing["wait_s"] / max(1, steps))
        self.engine.shutdown()

    def _report_stalls(self, loop_thread: int) -> None:
        """Log where the loop is, once per stall, when it has work but no step finished in time.

        The API's readiness check fails at the same moment (it reads the heartbeat); this line
        tells the operator which call is stuck.
        """
        reported = False
        while not self.stopping:
            time.sleep(min(1.0, self.watchdog_timeout_s / 4))
            silent = time.monotonic() - self._last_step
            stalled = self.busy and silent > self.watchdog_timeout_s
            if stalled and not reported:
                frame = sys._current_frames().get(loop_thread)
                where = "".join(traceback.format_stack(frame)) if frame is not None else "(loop thread gone)\n"
                logger.error("scheduler: work queued but no step finished for %.0fs; the loop is at:\n%s",
                             silent, where.rstrip())
            reported = stalled

    def handle(self, message: Any) -> None:
        if isinstance(message, AddReq):
            self._add(message)
        elif isinstance(message, AbortReq):
            for rid in message.rids:
                self.engine.abort_request(rid)
        elif isinstance(message, FlushCacheReq):
            ipc.send(self.to_api, FlushCacheReply(message.rid, self.engine.flush_cache()))
        else:
            logger.warning("scheduler: dropped an unexpected %s", type(message).__name__)

    def _add(self, message: AddReq) -> None:
        """Check every engine request of the API request first: all are admitted, or none."""
        try:
            prepared = [(r.rid, r.prompt_ids, SamplingParams(**r.params)) for r in message.requests]
            for _, prompt_ids, params in prepared:
                self.engine.check_request(prompt_ids, params)
        except (TypeError, ValueError) as err:
            param = "max_tokens" if "max_tokens" in str(err) else "prompt"
            ipc.send(self.to_api, ErrorReply(message.rid, str(err), param))
            return
        for rid, prompt_ids, params in prepared:
            self.engine.add_request(rid, prompt_ids, params)
            ipc.send(self.to_detokenizer, DetokInit(
                rid, prompt_ids[-8:], params.stop, params.skip_special_tokens, params.logprobs is not None
            ))

    def _step(self) -> None:
        outputs = self.engine.step()
        self._last_step = time.monotonic()
        if not outputs:
            return
        batch = [
            StepTokens(
                out.request_id, out.new_token_ids, out.finished,
                out.finish_reason.value if out.finish_reason is not None else None,
                [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in out.new_logprobs],
                out.prompt_tokens, out.completion_tokens, out.cached_tokens,
            )
            for out in outputs
        ]
        ipc.send(self.to_detokenizer, TokenBatch(batch))

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        s = self.engine.stats()
        try:
            self.engine.check_kv_invariant()
            invariant_ok = True
        except RuntimeError as err:
            invariant_ok = False
            logger.error("scheduler: %s", err)
        ipc.send(self.to_api, SchedulerStats(
            num_running=s["num_running"], num_waiting=s["num_waiting"], kv_pages_total=s["kv_pages_total"],
            kv_pages_free=s["kv_pages_free"], kv_pages_cached=s["kv_pages_cached"],
            cache_hit_tokens=s["cache_hit_tokens"], prompt_tokens=s["prompt_tokens"],
            generation_tokens=s["generation_tokens"], num_retractions=s["num_retractions"],
            num_evicted_pages=s["num_evicted_pages"], seconds_since_step=now - self._last_step,
            has_work=self.engine.has_unfinished(), kv_invariant_ok=invariant_ok,
        ))


def run_scheduler(run_dir: str, engine_args: EngineArgs, watchdog_timeout_s: float) -> None:
    from minisgl_jax.engine import Engine  # JAX is imported in this process only

    started = time.perf_counter()
    engine = Engine(engine_args)
    worker = SchedulerWorker(ipc.RunDir(run_dir), engine, watchdog_timeout_s)
    signal.signal(ipc.STOP_SIGNAL, lambda *_: setattr(worker, "stopping", True))
    plan = engine.memory_plan()
    ipc.send(worker.to_api, SchedulerReady(
        weights_bytes=plan["weights_bytes"], kv_pages=plan["kv_pages"], kv_tokens=plan["kv_tokens"],
        page_size=plan["page_size"], max_running_requests=plan["max_running_requests"],
        max_model_len=plan["max_model_len"], startup_seconds=time.perf_counter() - started,
    ))
    worker.serve_forever()

