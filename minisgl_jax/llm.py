"""The offline API, shaped like vLLM's: `LLM(model, **engine_args).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

from tqdm import tqdm

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import FinishReason, SamplingParams, TokenLogprob
from minisgl_jax.detokenizer import IncrementalDetokenizer
from minisgl_jax.engine import Engine

Prompt = str | list[int]


@dataclass
class Completion:
    """One request's result: text, token ids, why it ended and its token counts."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    error: str | None = None  # with FinishReason.ERROR: the engine's step for it failed, and how

    @property
    def usage(self) -> dict[str, int]:
        n_prompt, n_out = len(self.prompt_token_ids), len(self.token_ids)
        return dict(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                    cached_tokens=self.cached_tokens)


@dataclass
class Delta:
    """A streaming update: the new text and ids of one request since its last delta."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None


class LLM:
    def __init__(self, model: str, **engine_args) -> None:
        self.engine = Engine(EngineArgs(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Completion]:
        """Run every prompt (text or token ids) to completion; results in prompt order."""
        results: dict[int, Completion] = {}
        bar = None
        started = time.perf_counter()
        for delta in self._run(prompts, sampling_params, results, incremental=False):
            if use_tqdm and bar is None:
                bar = tqdm(total=len(results), desc="generating", unit="req")
            if bar is not None and delta.finished:
                bar.update(1)
                done_tokens = sum(len(c.token_ids) for c in results.values())
                bar.set_postfix(tok_s=f"{done_tokens / (time.perf_counter() - started):.0f}")
        if bar is not None:
            bar.close()
        return [results[i] for i in range(len(results))]

    def stream(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> Iterator[Delta]:
        """Yield text deltas as tokens are produced, for all prompts together."""
        yield from self._run(prompts, sampling_params, {}, incremental=True)

    def _run(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None,
        results: dict[int, Completion],
        incremental: bool,
    ) -> Iterator[Delta]:
        """Run the prompts, filling `results` (by prompt index) and yielding each step's deltas.

        Not `incremental` (generate): only requests with stop strings are detokenized step by step,
        the others once at their end, so text costs no host time between steps.
        """
        prompt_list = _as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        detoks: dict[str, tuple[int, IncrementalDetokenizer, bool]] = {}
        for index, (prompt, p) in enumerate(zip(prompt_list, params_list)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            results[index] = Completion(request_id=rid, prompt_token_ids=ids)
            live = incremental or bool(p.stop)
            detoks[rid] = (index, IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens, p.stop), live)
        try:
            while detoks:
                for out in self.engine.step():
                    if out.request_id not in detoks:
                        continue
                    index, detok, live = detoks[out.request_id]
                    result = results[index]
                    new_ids, new_logprobs = out.new_token_ids, out.new_logprobs
                    text = ""
                    if live and not detok.stopped:
                        text, used = detok.add_until_stop(new_ids)
                        new_ids, new_logprobs = new_ids[:used], new_logprobs[:used]
                    result.token_ids += new_ids
                    result.logprobs += new_logprobs
                    result.cached_tokens = out.cached_tokens
                    if out.prompt_logprobs is not None:
                        result.prompt_logprobs = out.prompt_logprobs
                    finished, reason = out.finished, out.finish_reason
                    if detok.stopped and not finished:
                        self.engine.abort_request(out.request_id)
                        finished, reason = True, FinishReason.STOP
                    elif detok.stopped:
                        reason = FinishReason.STOP
                    if finished and not detok.stopped:
                        text += detok.flush() if live else detok.add(result.token_ids) + detok.flush()
                    result.text += text
                    if finished:
                        result.finish_reason, result.error = reason, out.error
                        del detoks[out.request_id]
                    yield Delta(out.request_id, index, text, new_ids, finished, reason)
        finally:
            for rid in detoks:
                self.engine.abort_request(rid)
            while self.engine.has_unfinished():
                self.engine.step()


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single list of token ids
    return list(prompts)
