"""Grammar compilation off the caller's thread, bounded in time and size, with a bounded cache.

llguidance builds a grammar's lexer lazily, so a compilation here is: read the grammar, build the
matcher and compute its first mask (where a pathological regex spends its time). The result, a
matcher in its start state, is cached; each request gets a copy of it (about a microsecond).
A compilation cannot be interrupted (llguidance holds the thread, without the GIL): past its time
limit its handle reports the error at once, and the worker finishes in the background, bounded by
llguidance's own fuel limits. Failures are cached too, so a bad grammar sent again costs nothing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance

from minisgl_jax.grammar.matcher import GrammarMatcher
from minisgl_jax.grammar.spec import GrammarSpec
from minisgl_jax.grammar.vocab import GrammarVocab


@dataclass(frozen=True)
class CompilerConfig:
    """The compiler's bounds: worker threads, time and size per grammar, and the cache's size."""

    workers: int = 2
    timeout_s: float = 10.0
    max_source_bytes: int = 1 << 20  # the grammar's text
    max_grammar_symbols: int = 500_000  # llguidance's max_grammar_size, after expansion
    cache_entries: int = 512
    cache_bytes: int = 256 << 20

    def validate(self) -> None:
        for name in ("workers", "max_source_bytes", "max_grammar_symbols", "cache_entries", "cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


class CompiledGrammar:
    """A grammar ready to use: a matcher in its start state, copied for each request."""

    def __init__(self, start: llguidance.LLMatcher, vocab: GrammarVocab, nbytes: int) -> None:
        self._start = start
        self._vocab = vocab
        # llguidance reports no memory figure: the size of the grammar it was built from stands in.
        self.nbytes = nbytes

    def matcher(self, eos_token_ids: Iterable[int]) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy(), self._vocab, eos_token_ids)


def check_grammar(spec: GrammarSpec, max_source_bytes: int = CompilerConfig.max_source_bytes) -> None:
    """ValueError naming the field if `spec` is too large or not a valid grammar: llguidance's checks
    without a vocabulary (about a millisecond), for the API to answer 400 before the request is queued."""
    _check_size(spec, max_source_bytes)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec.to_llguidance())
    if is_error:
        raise ValueError(f"{spec.field} is invalid: {_one_line(messages[0])}")


def _one_line(message: str) -> str:
    """llguidance's multi-line message (source excerpts under carets) as one line for an error body."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip().strip("^"))


def _check_size(spec: GrammarSpec, max_source_bytes: int) -> None:
    if spec.size > max_source_bytes:
        raise ValueError(f"{spec.field} is too large: {spec.size} bytes, the limit is {max_source_bytes}")


class CompileHandle:
    """One submitted compilation, polled by the engine: `done()` never blocks."""

    def __init__(self, spec: GrammarSpec, job: _Job, timeout_s: float) -> None:
        self.spec = spec
        self._job = job
        self._timeout_s = timeout_s

    def done(self) -> bool:
        """Compiled, failed, or past its time limit."""
        return self._job.future.done() or self._overdue()

    def result(self) -> CompiledGrammar:
        """The compiled grammar once `done()`; ValueError naming the field if the grammar is invalid,
        too large or took longer than the time limit."""
        if self._job.future.done():
            outcome = self._job.future.result()
        elif self._overdue():
            outcome = _too_slow(self.spec, self._timeout_s)
        else:
            raise RuntimeError(f"the compilation of {self.spec.field} has not finished; poll done() first")
        if isinstance(outcome, ValueError):
            raise ValueError(str(outcome))
        return outcome

    def wait(self, timeout: float | None = None) -> CompiledGrammar:
        """Block until `done()` (for tests and offline use), at most `timeout` seconds more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            left = self._left()
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"the compilation of {self.spec.field} is still running")
            self._job.finished.wait(max(left, 0.001))
        return self.result()

    def _left(self) -> float:
        started = self._job.started
        return self._timeout_s if started is None else started + self._timeout_s - time.monotonic()

    def _overdue(self) -> bool:
        return self._job.started is not None and self._left() <= 0


class _Job:
    """A compilation in flight, shared by every handle of the same grammar."""

    def __init__(self) -> None:
        self.future: Future[CompiledGrammar | ValueError] = Future()
        self.started: float | None = None  # monotonic time the worker took it
        self.finished = threading.Event()


class GrammarCompiler:
    """Compiles grammars on a few worker threads; `submit` returns at once with a pollable handle.

    The cache holds the latest `cache_entries` outcomes within `cache_bytes` (least recently used
    first out); the same grammar submitted while it compiles shares the compilation.
    """

    def __init__(self, vocab: GrammarVocab, config: CompilerConfig = CompilerConfig()) -> None:
        config.validate()
        self.vocab = vocab
        self.config = config
        self._limits = llguidance.LLParserLimits(max_grammar_size=config.max_grammar_symbols, verbose_errors=False)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar | ValueError] = OrderedDict()
        self._cache_bytes = 0
        self._in_flight: dict[GrammarSpec, _Job] = {}

    def submit(self, spec: GrammarSpec) -> CompileHandle:
        with self._lock:
            job = self._in_flight.get(spec)
            if job is None:
                job = _Job()
                cached = self._cache.get(spec)
                if cached is not None:
                    self._cache.move_to_end(spec)
                    job.future.set_result(cached)
                    job.finished.set()
                else:
                    self._in_flight[spec] = job
                    self._pool.submit(self._run, spec, job)
        return CompileHandle(spec, job, self.config.timeout_s)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Submit and wait: for the offline API and tests, never for the engine's loop."""
        return self.submit(spec).wait()

    @property
    def cache_size(self) -> tuple[int, int]:
        """(entries, bytes) in the cache now."""
        with self._lock:
            return len(self._cache), self._cache_bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, spec: GrammarSpec, job: _Job) -> None:
        job.started = time.monotonic()
        try:
            outcome: CompiledGrammar | ValueError = self._build(spec)
        except ValueError as err:
            outcome = err
        except Exception as err:  # llguidance's own failures: the request fails, the worker lives on
            outcome = ValueError(f"{spec.field} could not be compiled: {type(err).__name__}: {err}")
        if time.monotonic() - job.started > self.config.timeout_s:
            outcome = _too_slow(spec, self.config.timeout_s)
        with self._lock:
            self._in_flight.pop(spec, None)
            self._store(spec, outcome)
        job.future.set_result(outcome)
        job.finished.set()

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        _check_size(spec, self.config.max_source_bytes)
        grammar = spec.to_llguidance()
        matcher = llguidance.LLMatcher(self.vocab.ll_tokenizer, grammar, log_level=0, limits=self._limits)
        if not matcher.is_error():
            matcher.compute_bitmask()  # builds the lexer's start: the slow part of a pathological regex
        if matcher.is_error():
            raise ValueError(f"{spec.field} is invalid: {_one_line(matcher.get_error())}")
        return CompiledGrammar(matcher, self.vocab, len(grammar) + spec.size)

    def _store(self, spec: GrammarSpec, outcome: CompiledGrammar | ValueError) -> None:
        nbytes = _nbytes(outcome)
        if nbytes > self.config.cache_bytes:
            return
        self._cache[spec] = outcome
        self._cache_bytes += nbytes
        while len(self._cache) > self.config.cache_entries or self._cache_bytes > self.config.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= _nbytes(evicted)


def _too_slow(spec: GrammarSpec, timeout_s: float) -> ValueError:
    return ValueError(f"{spec.field} took longer than the grammar compile time limit of {timeout_s:g} s")


def _nbytes(outcome: CompiledGrammar | ValueError) -> int:
    return outcome.nbytes if isinstance(outcome, CompiledGrammar) else len(str(outcome))
