"""The host's part of the logits-processing stage, per step: writing a request's slot when it takes
one (penalties, logit_bias, min_tokens), filling the grammar masks of constrained rows, and moving
each grammar past the tokens it gets back."""

from __future__ import annotations

import numpy as np

from minisgl_jax.core import FinishReason
from minisgl_jax.engine.batch import ScheduledBatch
from minisgl_jax.engine.logits_processing import seed_chunks
from minisgl_jax.engine.model_runner import ModelRunner
from minisgl_jax.engine.request import Req
from minisgl_jax.grammar import grammar_spec
from minisgl_jax.grammar.matcher import fill_masks


def seed_slots(batch: ScheduledBatch, runner: ModelRunner, eos_token_ids: set[int], bias_width: int) -> None:
    """Write the slot of each request that processes its logits and has just taken one (a new or a
    retracted request: its output so far counts too)."""
    for row in batch.rows:
        req, p = row.req, row.req.params
        if p.processes_logits and not req.processing_seeded:
            stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(eos_token_ids))
            runner.seed_slot(seed_chunks(req.slot, req.prompt_ids, req.output_ids, stop_ids, p.logit_bias or {},
                                         bias_width, runner.vocab_size))
            req.processing_seeded = True


def grammar_masks(batch: ScheduledBatch, seqs: int, mask_words: int) -> np.ndarray:
    """Each constrained row's allowed next tokens; every token for the other rows (and for a request
    that has ended since it was scheduled: its row's token is dropped)."""
    masks = np.full((seqs, mask_words), -1, np.int32)
    fill_masks([(i, row.req.grammar) for i, row in enumerate(batch.rows)
                if row.samples and row.req.grammar is not None and not row.req.finished], masks)
    return masks


def advance_grammar(req: Req, token: int) -> FinishReason | None:
    """Move the request's grammar past `token`: STOP once the grammar is complete, ERROR (with the
    reason in `req.error`) when no token can follow."""
    grammar = req.grammar
    if not grammar.accept(token) or grammar.is_dead:
        req.error = f"the output left its grammar: {grammar.error}"
        req.error_field = grammar_spec(req.params).field
        return FinishReason.ERROR
    return FinishReason.STOP if grammar.is_finished else None
