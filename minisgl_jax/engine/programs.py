"""The compiled step programs, by key: each compiled once, by whichever thread needs it first.

Three kinds of thread compile programs: start-up (every plain program, in a pool), the background
compiler (the sampling variants, engine/warmup.py) and the engine's own step, for a program nobody
compiled yet. A thread that needs a program another has under way waits for it instead of
compiling it a second time. A program that fails to compile raises CompileError: a failure on
the host, which leaves the device's state as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from minisgl_jax.engine.batch import PackedLayout, StepKey


class ProgramKey(NamedTuple):
    """What selects one compiled step program: the batch's bucket and layout, and the step's key."""

    layout: PackedLayout
    step: StepKey

    def describe(self) -> str:
        return self.step.describe()


class CompileError(RuntimeError):
    """A step program failed to trace, lower or compile."""


Lower = Callable[[ProgramKey, np.ndarray], jax.stages.Lowered]


class StepPrograms:
    def __init__(self, lower: Lower) -> None:
        self._lower = lower  # traces and lowers a program: Python, under the GIL
        self.compiled: dict[ProgramKey, Any] = {}  # ready to call
        self._compiling: dict[ProgramKey, Future] = {}  # under way, or done, in some thread
        self._lock = threading.Lock()
        # Whether a caller of get() waits for a program to compile: the scheduler reports a step
        # that waits this way as compiling, not as hung.
        self.compiling = False

    def get(self, key: ProgramKey, packed: np.ndarray) -> Any:
        """The compiled program of `key`: compiled here on first use, or awaited from the thread
        that already has it under way."""
        future, mine = self._claim(key)
        if future.done():
            return future.result()
        self.compiling = True
        try:
            if mine:
                self._settle(key, future, lambda: self._lower(key, packed).compile())
            return future.result()
        finally:
            self.compiling = False

    def start_compile(self, key: ProgramKey, packed: np.ndarray, pool: Executor) -> Future | None:
        """Lower `key` here and compile it in `pool` (XLA compiles outside the GIL); returns the
        program's future, or None when some thread already has the program."""
        future, mine = self._claim(key)
        if not mine:
            return None
        try:
            pool.submit(self._settle, key, future, self._lower(key, packed).compile)
        except BaseException as error:
            self._fail(key, future, error)
            raise
        return future

    def compile_all(self, programs: list[tuple[ProgramKey, np.ndarray]], workers: int) -> None:
        """Compile each (key, example packed batch) now.

        Tracing and lowering are Python and hold the GIL, so they run here one program at a time;
        each lowered program goes to a pool of `workers` threads at once, where XLA compiles (or
        loads from the persistent cache) outside the GIL while the next one is traced; tracing in
        every thread at once was slower, the threads contending for the GIL.
        """
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for key, packed in tqdm(programs, desc="lowering step programs", disable=None):
                self.start_compile(key, packed, pool)
            for key, packed in programs:
                self.get(key, packed)

    def _claim(self, key: ProgramKey) -> tuple[Future, bool]:
        """The future of `key`'s program, and whether the caller is the one to make it."""
        with self._lock:
            future = self._compiling.get(key)
            if future is not None:
                return future, False
            future = self._compiling[key] = Future()
            return future, True

    def _settle(self, key: ProgramKey, future: Future, make: Callable[[], Any]) -> None:
        try:
            self.compiled[key] = compiled = make()
        except Exception as error:
            failure = CompileError(f"compiling {key.describe()} failed: {type(error).__name__}: {error}")
            failure.__cause__ = error
            self._fail(key, future, failure)
        except BaseException as error:
            self._fail(key, future, error)
        else:
            future.set_result(compiled)

    def _fail(self, key: ProgramKey, future: Future, error: BaseException) -> None:
        """Everyone waiting on `key` gets the error; a later call tries again."""
        future.set_exception(error)
        with self._lock:
            del self._compiling[key]
