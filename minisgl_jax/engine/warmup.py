"""Start-up compilation, CUDA-graph capture's counterpart: every step program the engine can launch
(decode buckets, their cascade and burst variants, prefill buckets), compiled in parallel and run
once; then, in a background thread while the engine serves, the same programs' variants that
sample with top-k / top-p / min-p or report logprobs."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Protocol

import numpy as np

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import MAX_LOGPROBS
from minisgl_jax.engine import cascade as cascade_groups
from minisgl_jax.engine.batch import (
    BatchConstants,
    ScheduledBatch,
    StepKey,
    build_step_batch,
    pack_batch,
    processing_arrays,
)
from minisgl_jax.engine.buckets import Buckets
from minisgl_jax.engine.model_runner import ModelRunner
from minisgl_jax.engine.programs import ProgramKey
from minisgl_jax.engine.sampler import SAMPLE_FILTERED, SAMPLE_PLAIN

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """What warm-up needs of the engine (engine.py imports this module, not the other way round)."""

    args: EngineArgs
    runner: ModelRunner
    buckets: Buckets
    batch_constants: BatchConstants

    def has_unfinished(self) -> bool: ...

# (sample mode, logprobs, logits processing) of the programs compiled in the background, the
# likeliest first: chat front-ends send top_p and penalties more often than they ask for logprobs.
SAMPLING_VARIANTS = (
    (SAMPLE_FILTERED, 0, False), (SAMPLE_PLAIN, 0, True), (SAMPLE_FILTERED, 0, True),
    (SAMPLE_PLAIN, MAX_LOGPROBS, False), (SAMPLE_FILTERED, MAX_LOGPROBS, False),
    (SAMPLE_PLAIN, MAX_LOGPROBS, True), (SAMPLE_FILTERED, MAX_LOGPROBS, True),
)


def step_programs(
    engine: Engine, sample_mode: str = SAMPLE_PLAIN, num_logprobs: int = 0, logits_processing: bool = False,
    stage: str = "full",
) -> list[tuple[ProgramKey, np.ndarray]]:
    """Each program of the engine's buckets, its key with an empty example batch (packed); the
    stages of a constrained step exist for single steps only (constrained rows never burst)."""
    programs = []
    no_groups = (np.zeros(0, np.int32), np.zeros((cascade_groups.MAX_GROUPS, 3), np.int32))
    for shape in engine.buckets.programs():
        if stage != "full" and shape.num_steps > 1:
            continue
        scheduled = ScheduledBatch(rows=[], is_decode=shape.is_decode, num_steps=shape.num_steps)
        step_batch = build_step_batch(scheduled, shape.tokens, shape.seqs, engine.batch_constants,
                                      no_groups if shape.cascade else None)
        if logits_processing:
            step_batch.processing = processing_arrays([], shape.seqs, engine.batch_constants.scratch_slot)
        packed, layout = pack_batch(step_batch)
        key = StepKey(shape.is_decode, sample_mode, num_logprobs, shape.num_steps, logits_processing, stage=stage)
        programs.append((ProgramKey(layout, key), packed))
    return programs


# The stages of constrained steps (a grammar's mask between them), after every other variant.
STAGE_VARIANTS = ((SAMPLE_PLAIN, 0, True, "sample"), (SAMPLE_FILTERED, 0, True, "sample"))


def variant_programs(engine: Engine) -> list[tuple[ProgramKey, np.ndarray]]:
    """Every program in each of SAMPLING_VARIANTS, then the constrained stages: what the background
    compiler compiles."""
    variants = [*SAMPLING_VARIANTS, (SAMPLE_PLAIN, 0, True, "forward"), *STAGE_VARIANTS]
    return [program for variant in variants for program in step_programs(engine, *variant)]


def compile_programs(engine: Engine) -> float:
    """Compile and run every plain step program once; returns the seconds it took."""
    started = time.perf_counter()
    programs = step_programs(engine)
    workers = engine.args.compile_workers or os.cpu_count() or 1
    engine.runner.programs.compile_all(programs, workers=min(len(programs), workers))
    for program, packed in programs:
        engine.runner.run_packed(packed, program).ids.block_until_ready()
    seconds = time.perf_counter() - started
    logger.info("compiled %d step programs in %.1fs", len(programs), seconds)
    return seconds


class BackgroundCompiler:
    """Compiles the sampling variants of every step program (SAMPLING_VARIANTS) in a daemon thread
    while the engine is idle.

    Start-up compiles only the plain programs (greedy and temperature, no logprobs): compiling all
    four kinds there would take about 4x as long; without this, the first request with top_p (or
    logprobs) in a batch of each new shape, and its whole batch, waited for that program's compile.
    Tracing holds the GIL, which the engine's own host work needs, so a program is traced only
    while the engine has no requests; the compiles themselves (outside the GIL) run whenever, in up
    to `workers` threads at once. A request that needs a program before this thread gets to it
    compiles it itself; one that needs a program under way here waits for it (StepPrograms.get)."""

    POLL_S = 0.05  # how often a paused compiler looks whether the engine is idle

    def __init__(self, engine: Engine, programs: list[tuple[ProgramKey, np.ndarray]], workers: int) -> None:
        self._stop = threading.Event()
        # The thread holds the engine weakly: a dropped engine ends it after the programs under way.
        self.thread = threading.Thread(
            target=self._compile_each, args=(weakref.ref(engine), programs, workers), name="compile-variants",
            daemon=True,
        )
        self.thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Compile nothing more; wait for the programs under way (at exit: at most one compile, ~6 s
        cold for Llama-3.1-8B). Registered for exit, so that no thread is inside XLA's compiler while
        the interpreter and XLA's own state are torn down."""
        self._stop.set()
        self.thread.join()
        atexit.unregister(self.stop)

    def _compile_each(self, engine_ref: weakref.ref, programs: list[tuple[ProgramKey, np.ndarray]], workers: int) -> None:
        started = time.perf_counter()
        in_flight: set[Future] = set()
        threads = _DaemonThreads()
        try:
            for key, packed in programs:
                if len(in_flight) >= workers:  # lower no further ahead than the compiles go
                    _, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                if not self._wait_until_idle(engine_ref):
                    return
                engine = engine_ref()
                try:
                    future = engine.runner.programs.start_compile(key, packed, threads)
                except Exception as error:  # the request that needs it meets the error again, in its step
                    logger.warning("background compile of %s failed: %s", key.describe(), error)
                    future = None
                del engine
                if future is not None:
                    future.add_done_callback(_log_failure)
                    in_flight.add(future)
        finally:
            wait(in_flight)
        logger.info("compiled %d more step programs (top-k/top-p/min-p, logprobs) in the background in %.1fs",
                    len(programs), time.perf_counter() - started)

    def _wait_until_idle(self, engine_ref: weakref.ref) -> bool:
        """Wait while the engine has requests; False when stopped or the engine is gone."""
        while not self._stop.is_set():
            engine = engine_ref()
            if engine is None:
                return False
            if not engine.has_unfinished():
                return True
            del engine
            self._stop.wait(self.POLL_S)
        return False


class _DaemonThreads(Executor):
    """Runs each call in a daemon thread of its own. Not concurrent.futures' pool: at exit it joins
    its workers and refuses new work before the atexit handlers (BackgroundCompiler.stop) run."""

    def submit(self, fn: Callable, /, *args) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as error:
                future.set_exception(error)

        threading.Thread(target=run, name="compile-variant", daemon=True).start()
        return future


def _log_failure(future: Future) -> None:
    if future.exception() is not None:  # a CompileError, which names the program
        logger.warning("background %s", future.exception())


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's automatic collections off while the step programs compile.

    Tracing and compiling make hundreds of thousands of long-lived objects, and every few thousand
    new ones start a collection that walks them all and finds next to nothing (RESULTS.md, "The
    sampler's argmax in the step's own exchange, and the GC freeze on the GPU"). The freeze that
    follows collects once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_start_up_objects(engine: Engine) -> None:
    """Keep the objects start-up made (JAX's traces and caches: ~660k) out of Python's collector
    while `engine` lives.

    A full collection walks every tracked object, and one landing in a run stalls serving that long
    (RESULTS.md, same section). Frozen, they cost it nothing. The engine's arrays sit in reference cycles, so frozen they would outlive
    it, device memory and all: when the engine goes, everything is thawed again (`gc.unfreeze`), and
    the next collection, or the next engine's start (`Engine.__init__`), frees them."""
    gc.collect()
    gc.freeze()
    weakref.finalize(engine, gc.unfreeze)
