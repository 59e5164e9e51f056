"""What the host makes of a step's arrays for its requests: the sampled tokens appended (and the
requests they end), prompt logprobs collected chunk by chunk, and each request's `RequestOutput`
since its last one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from minisgl_jax.core import FinishReason, RequestOutput, TokenLogprob
from minisgl_jax.engine import constraints
from minisgl_jax.engine.batch import ScheduledBatch, StepOutput
from minisgl_jax.engine.request import Req


def append_tokens(
    batch: ScheduledBatch, ids: np.ndarray, logprob: np.ndarray | None, top_ids: np.ndarray | None,
    top_lps: np.ndarray | None, eos_token_ids: set[int], finish: Callable[[Req, FinishReason], None],
) -> tuple[list[RequestOutput], int]:
    """Append each row's sampled tokens ([steps, rows] arrays: a burst's, or one step's as a burst of
    one) to its request and `finish` the requests they end; returns the outputs and the tokens taken.
    A burst's tokens past a stop are dropped."""
    outputs, taken = [], 0
    for i, row in enumerate(batch.rows):
        req = row.req
        req.in_flight -= 1
        if not row.samples or req.finished:
            continue
        for k in range(row.steps):
            token = int(ids[k, i])
            req.output_ids.append(token)
            taken += 1
            if req.params.logprobs is not None:
                n = req.params.logprobs
                top = [(int(t), float(lp)) for t, lp in zip(top_ids[k, i, :n], top_lps[k, i, :n])]
                req.output_logprobs.append(TokenLogprob(token, float(logprob[k, i]), top))
            reason = finish_reason(req, token, eos_token_ids)
            if reason is None and req.grammar is not None:
                reason = constraints.advance_grammar(req, token)
            if reason is not None:
                finish(req, reason)
                break
        outputs.append(request_output(req))
    return outputs, taken


def finish_reason(req: Req, token: int, eos_token_ids: set[int]) -> FinishReason | None:
    """Why `token`, just appended, ends `req`; None when it goes on."""
    if token in eos_token_ids and not req.params.ignore_eos:
        return FinishReason.STOP
    if token in req.params.stop_token_ids:
        return FinishReason.STOP
    if len(req.output_ids) >= req.max_new_tokens:
        return FinishReason.LENGTH
    return None


def collect_prompt_logprobs(batch: ScheduledBatch, out: StepOutput) -> None:
    """Each prompt token's logprob from the position before it, for the rows that ask; a chunk
    computed again (after a retraction) adds nothing."""
    chosen, top_ids, top_lps = map(StepOutput.to_host, (out.prompt_logprob, out.prompt_top_ids,
                                                        out.prompt_top_logprobs))
    t = 0
    for row in batch.rows:
        req, n = row.req, row.req.params.prompt_logprobs
        for j in range(row.num_tokens if n is not None else 0):
            target = row.start + j + 1
            if target < len(req.prompt_ids) and len(req.prompt_logprobs) == target:
                top = [(int(i), float(lp)) for i, lp in zip(top_ids[t + j, :n], top_lps[t + j, :n])]
                req.prompt_logprobs.append(TokenLogprob(req.prompt_ids[target], float(chosen[t + j]), top))
        t += row.num_tokens


def request_output(req: Req) -> RequestOutput:
    """The request's new tokens (and logprobs) since its last output; its prompt logprobs once."""
    new = req.output_ids[req.num_emitted :]
    new_lps = req.output_logprobs[req.num_emitted :] if req.params.logprobs is not None else []
    req.num_emitted = len(req.output_ids)
    prompt_logprobs = None
    if (req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent
            and len(req.prompt_logprobs) == len(req.prompt_ids)):
        prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
    return RequestOutput(
        request_id=req.request_id,
        new_token_ids=new,
        finished=req.finished,
        finish_reason=req.finish_reason,
        new_logprobs=new_lps,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens,
        error=req.error,
        error_field=req.error_field,
        prompt_logprobs=prompt_logprobs,
    )
