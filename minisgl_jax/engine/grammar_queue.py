"""Constrained requests while their grammar compiles: they wait here, outside the scheduler, so a
slow grammar holds up nothing else; across hosts, node 0 says when a grammar is ready."""

from __future__ import annotations

from collections.abc import Callable

from minisgl_jax.core import FinishReason
from minisgl_jax.engine.request import Phase, Req
from minisgl_jax.grammar import CompilerConfig, GrammarCompiler, GrammarVocab, grammar_spec


class GrammarQueue:
    def __init__(self, eos_token_ids: set[int], timeout_s: float) -> None:
        self._eos_token_ids = eos_token_ids
        self._timeout_s = timeout_s
        self.compiler: GrammarCompiler | None = None  # made by `prepare`
        self.waiting: list[Req] = []

    def prepare(self, make_vocab: Callable[[], GrammarVocab]) -> None:
        """Make the compiler, with the tokenizer's vocabulary in llguidance's form, if not yet made:
        at warm-up, or for the first constrained request; ValueError if the tokenizer cannot be."""
        if self.compiler is None:
            self.compiler = GrammarCompiler(make_vocab(), CompilerConfig(timeout_s=self._timeout_s))

    def submit(self, req: Req) -> None:
        req.grammar_compile = self.compiler.submit(grammar_spec(req.params))
        self.waiting.append(req)

    def drop(self, req: Req) -> bool:
        """Take out a request (aborted); False when it was not waiting here."""
        if req not in self.waiting:
            return False
        self.waiting.remove(req)
        return True

    def compiled(self) -> list[tuple[str, str | None]]:
        """(request id, error or None) of each grammar done since the last call."""
        done = []
        for req in [r for r in self.waiting if r.grammar_compile.done() and not r.grammar_announced]:
            try:
                req.grammar_compile.result()
                done.append((req.request_id, None))
            except ValueError as err:  # past the time or size limit, or invalid after all
                done.append((req.request_id, str(err)))
            req.grammar_announced = True
        return done

    def take(self, req: Req, error: str | None) -> bool:
        """Give the request a matcher of its grammar (True: it may be scheduled), or end it with
        `error` and the field at fault (False)."""
        self.waiting.remove(req)
        if error is not None:
            req.phase, req.finish_reason, req.error = Phase.FINISHED, FinishReason.ERROR, error
            req.error_field = req.grammar_compile.spec.field
            return False
        try:  # compiled where it was decided (node 0): this node's copy must be too, however long it takes
            compiled = req.grammar_compile.wait()
        except (TimeoutError, ValueError) as err:
            raise RuntimeError(f"request {req.request_id}: the grammar compiled on node 0 but not here ({err}); "
                               f"the nodes would no longer take the same steps") from err
        p = req.params
        ends = set(p.stop_token_ids) | (set() if p.ignore_eos else self._eos_token_ids)
        req.grammar, req.grammar_compile = compiled.matcher(ends), None
        return True
