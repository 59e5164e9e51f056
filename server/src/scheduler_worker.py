"""The scheduler process: owns the Engine (every local GPU) and steps it while there is work.

Between steps it drains its inbox without blocking; idle, it waits on the inbox. A thread of its
own sends the API a heartbeat twice a second: the queue and KV figures of the loop's latest pass,
how long the loop's current pass has run, and whether it waits for a compile. The heartbeat keeps
coming while a pass runs long, so /health tells a stopped process (no heartbeat) from a loop that
makes no progress (a pass past --watchdog-timeout) and from a long compile.

A step that fails ends its requests with an error and the loop goes on; a broken engine
(EngineBroken) ends the process with code 1, and the API then fails every request in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
from minisgl_jax.core import RequestOutput, SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.engine.step_failures import EngineBroken

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
        self.heartbeats = ipc.connect_outbox(context, run_dir, "api")  # the heartbeat thread's: a socket per thread
        self.stopping = False
        self.busy = False
        self.first_prompt_tokens: dict[str, int] = {}  # of requests with prompt logprobs still to send
        self._pass_started = time.monotonic()
        self._figures: dict[str, Any] = {}  # the heartbeat's figures, as of the latest pass that took them
        self._figures_at = 0.0

    def serve_forever(self) -> None:
        self._maybe_take_figures()
        threading.Thread(target=self._beat, args=(threading.get_ident(),), daemon=True, name="heartbeat").start()
        while not self.stopping:
            self._pass_started = time.monotonic()
            self.busy = busy = self.engine.has_unfinished()
            for message in ipc.receive_all(self.inbox, timeout_ms=0 if busy else IDLE_POLL_MS):
                self.handle(message)
            if self.engine.has_unfinished():
                self._step()
            self._maybe_take_figures()
        steps, timing = self.engine.stats()["steps"], self.engine.timing
        logger.info("scheduler stopping after %d steps: %.2f ms host and %.2f ms waiting for the device per step",
                    steps, 1e3 * (timing["step_s"] - timing["wait_s"]) / max(1, steps),
                    1e3 * timing["wait_s"] / max(1, steps))
        self.engine.shutdown()

    def _beat(self, loop_thread: int) -> None:
        """Send the heartbeat every HEARTBEAT_S; when the loop's current pass runs past the watchdog
        timeout, log where the loop is, once per stall.

        /health fails at the same moment (it reads the heartbeat); this line tells the operator
        which call is stuck.
        """
        reported = False
        while not self.stopping:
            busy_s, compiling = time.monotonic() - self._pass_started, self.engine.compiling
            ipc.send(self.heartbeats, SchedulerStats(**self._figures, busy_s=busy_s, has_work=self.busy,
                                                     compiling=compiling))
            stalled = busy_s > self.watchdog_timeout_s
            if stalled and not reported:
                frame = sys._current_frames().get(loop_thread)
                where = "".join(traceback.format_stack(frame)) if frame is not None else "(loop thread gone)\n"
                doing = "waiting for a step program to compile" if compiling else "in a step or a message"
                logger.error("scheduler: no progress for %.0fs, %s; the loop is at:\n%s", busy_s, doing,
                             where.rstrip())
            reported = stalled
            time.sleep(HEARTBEAT_S)

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
            ipc.send(self.to_api, ErrorReply(message.rid, str(err), refused_field(str(err))))
            return
        echo_texts = {r.rid: r.echo_text for r in message.requests}
        for rid, prompt_ids, params in prepared:
            self.engine.add_request(rid, prompt_ids, params)
            if params.prompt_logprobs is not None:
                self.first_prompt_tokens[rid] = prompt_ids[0]
            ipc.send(self.to_detokenizer, DetokInit(
                rid, prompt_ids[-8:], params.stop, params.skip_special_tokens, params.logprobs is not None,
                echo_texts[rid],
            ))

    def _prompt_logprobs(self, out: RequestOutput) -> list[list[Any]] | None:
        """The wire form of a request's prompt logprobs, the first token (nothing predicts it) with None."""
        if out.prompt_logprobs is None:
            if out.finished:  # ended before its prompt's logprobs were complete (an abort, an error)
                self.first_prompt_tokens.pop(out.request_id, None)
            return None
        first = self.first_prompt_tokens.pop(out.request_id)
        return [[first, None, []]] + [
            [lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in out.prompt_logprobs[1:]
        ]

    def _step(self) -> None:
        outputs = self.engine.step()
        if not outputs:
            return
        batch = [
            StepTokens(
                out.request_id, out.new_token_ids, out.finished,
                out.finish_reason.value if out.finish_reason is not None else None,
                [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in out.new_logprobs],
                out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                self._prompt_logprobs(out), out.error, out.error_field,
            )
            for out in outputs
        ]
        ipc.send(self.to_detokenizer, TokenBatch(batch))

    def _maybe_take_figures(self) -> None:
        """Every HEARTBEAT_S, between passes (where the KV invariant must hold), the figures the
        heartbeat sends."""
        now = time.monotonic()
        if now - self._figures_at < HEARTBEAT_S:
            return
        self._figures_at = now
        s = self.engine.stats()
        try:
            self.engine.check_kv_invariant()
            invariant_ok = True
        except RuntimeError as err:
            invariant_ok = False
            logger.error("scheduler: %s", err)
        self._figures = dict(
            num_running=s["num_running"], num_waiting=s["num_waiting"], kv_pages_total=s["kv_pages_total"],
            kv_pages_free=s["kv_pages_free"], kv_pages_cached=s["kv_pages_cached"],
            cache_hit_tokens=s["cache_hit_tokens"], prompt_tokens=s["prompt_tokens"],
            generation_tokens=s["generation_tokens"], num_retractions=s["num_retractions"],
            num_evicted_pages=s["num_evicted_pages"], kv_invariant_ok=invariant_ok,
        )


def refused_field(message: str) -> str:
    """The request field an engine refusal names: its first word when that is a sampling field
    (SamplingParams and check_request start their messages so), else max_tokens or the prompt."""
    first = message.split(maxsplit=1)[0] if message else ""
    if first in {f.name for f in dataclasses.fields(SamplingParams)}:
        return first
    return "max_tokens" if "max_tokens" in message else "prompt"


def run_scheduler(run_dir: str, engine_args: EngineArgs, watchdog_timeout_s: float) -> None:
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
    try:
        worker.serve_forever()
    except EngineBroken as err:
        logger.error("scheduler: the engine is broken (%s); exiting, so that the server stops and can be "
                     "restarted", err, exc_info=err)
        # No interpreter teardown: after a device error XLA's exit hooks may block on the device,
        # and the API fails its requests only once it sees this process gone.
        os._exit(1)

