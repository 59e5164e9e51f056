"""A request's host-side state while the scheduler holds it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from minisgl_jax.core import FinishReason, SamplingParams, TokenLogprob
from minisgl_jax.grammar import CompileHandle, GrammarMatcher


class Phase(enum.Enum):
    WAITING = "waiting"  # queued (new, or retracted and to be recomputed)
    PREFILL = "prefill"  # admitted, prompt chunks still to compute
    DECODE = "decode"  # one token a step
    FINISHED = "finished"


@dataclass
class Req:
    """Tokens, pages and progress of one request.

    kv_len counts positions whose K/V is written or will be by steps already dispatched;
    num_sampled counts output tokens sampled or to be sampled by those steps; output_ids holds
    the ones the host has read. With overlap, a step is in flight while the next is scheduled.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    arrival: int
    phase: Phase = Phase.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_sampled: int = 0
    kv_len: int = 0
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    num_cache_pages: int = 0  # pages[:num_cache_pages] belong to the prefix cache (locked by cache_handle)
    cache_handle: Any = None
    cached_tokens: int = 0  # prefix-cache hit at the latest admission
    in_flight: int = 0  # dispatched steps with rows of this request not yet processed
    num_emitted: int = 0
    finish_reason: FinishReason | None = None
    prompt_cached: bool = False  # its prefill's pages went to the prefix cache
    sampling_row: tuple | None = None  # cached per-request sampling values of the step batch
    processing_seeded: bool = False  # its slot holds its logits-processing state (logits_processing.py)
    # With params.prompt_logprobs: those of prompt_ids[:len(prompt_logprobs)] so far ([None]: the first has none)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False
    grammar_compile: CompileHandle | None = None  # structured output: its grammar, compiling
    grammar: GrammarMatcher | None = None  # then where the output stands in it
    grammar_announced: bool = False  # multi-host: node 0 has sent that its grammar compiled
    error: str | None = None  # why it ended with FinishReason.ERROR, when the step did not fail
    error_field: str | None = None  # the request field that error is about (its grammar)
    # params.processes_logits, read once: every step's batch asks it of every row
    processes_logits: bool = field(init=False)

    def __post_init__(self) -> None:
        self.processes_logits = self.params.processes_logits

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def target_len(self) -> int:
        """Tokens the request must have computed K/V for before it samples again."""
        return len(self.prompt_ids) + self.num_sampled

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED
