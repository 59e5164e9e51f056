"""What the host makes of a step's arrays for its requests: prompt logprobs collected chunk by
chunk, and each request's `RequestOutput` since its last one."""

from __future__ import annotations

from minisgl_jax.core import RequestOutput, TokenLogprob
from minisgl_jax.engine.batch import ScheduledBatch, StepOutput
from minisgl_jax.engine.request import Req


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
