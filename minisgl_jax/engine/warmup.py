"""Start-up compilation, CUDA-graph capture's counterpart: every step program the engine can launch
(decode buckets, their cascade and burst variants, prefill buckets), compiled in parallel and run once."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from minisgl_jax.engine import cascade as cascade_groups
from minisgl_jax.engine.batch import ScheduledBatch, build_step_batch
from minisgl_jax.engine.model_runner import StepBatch
from minisgl_jax.engine.sampler import SAMPLE_PLAIN

if TYPE_CHECKING:
    from minisgl_jax.engine.engine import Engine

logger = logging.getLogger(__name__)


def step_programs(engine: Engine) -> list[tuple[StepBatch, bool, int]]:
    """An empty example batch of each program: (batch, is_decode, decode steps per launch)."""
    batches = []
    no_groups = (np.zeros(0, np.int32), np.zeros((cascade_groups.MAX_GROUPS, 3), np.int32))
    cascade_buckets = [n for n in engine.decode_buckets if engine.cascade and n >= cascade_groups.MIN_BUCKET]
    for is_decode, size, cascade, steps in (
        [(True, n, None, 1) for n in engine.decode_buckets]
        + [(True, n, no_groups, 1) for n in cascade_buckets]
        + [(True, n, None, engine.args.decode_steps) for n in engine.burst_buckets()]
        + [(False, n, None, 1) for n in engine.prefill_buckets]
    ):
        seqs = size if is_decode else min(size, engine.args.max_running_requests)
        batches.append((build_step_batch(
            ScheduledBatch(rows=[], is_decode=is_decode, num_steps=steps), size, seqs, engine.page_size,
            engine.pages_per_seq, engine.runner.scratch_slot, engine.model_config.vocab_size, cascade,
        ), is_decode, steps))
    return batches


def compile_programs(engine: Engine) -> float:
    """Compile and run every step program once; returns the seconds it took."""
    started = time.perf_counter()
    batches = step_programs(engine)
    workers = engine.args.compile_workers or os.cpu_count() or 1
    engine.runner.compile(batches, workers=min(len(batches), workers))
    for batch, is_decode, steps in batches:
        engine.runner.run(
            batch, is_decode=is_decode, sample_mode=SAMPLE_PLAIN, num_logprobs=0, num_steps=steps
        ).ids.block_until_ready()
    seconds = time.perf_counter() - started
    logger.info("compiled %d step programs in %.1fs", len(batches), seconds)
    return seconds


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's automatic collections off while the step programs compile.

    Tracing and compiling make hundreds of thousands of long-lived objects, and every few thousand
    new ones start a collection that walks them all and finds next to nothing: 9-12 full collections,
    1.9-3.9 s of a Llama-3.1-8B start-up on the H200 host (benchmarks/RESULTS.md). The freeze that
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

    A full collection walks every tracked object: ~0.4 s on a 2-core CPU with a tiny model, 0.2-1.2 s
    on the H200 host with Llama-3.1-8B, and one landing in a run stalls serving that long. Frozen,
    they cost it nothing. The engine's arrays sit in reference cycles, so frozen they would outlive
    it, device memory and all: when the engine goes, everything is thawed again (`gc.unfreeze`), and
    the next collection, or the next engine's start (`Engine.__init__`), frees them."""
    gc.collect()
    gc.freeze()
    weakref.finalize(engine, gc.unfreeze)
