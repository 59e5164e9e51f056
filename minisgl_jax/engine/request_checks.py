"""What a request may ask of one engine: checked before it is queued, so that a request the engine
could never serve is refused at once with the numbers, not failed later."""

from __future__ import annotations

from dataclasses import dataclass

from minisgl_jax.core import SamplingParams
from minisgl_jax.grammar import check_grammar, grammar_spec
from minisgl_jax.kvcache.allocator import pages_for


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    kv_pages: int  # usable pages of the whole pool
    page_size: int
    max_logit_bias: int

    def max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """max_tokens, or without one, up to the context length or what the whole KV pool holds."""
        if params.max_tokens is not None:
            return params.max_tokens
        return min(self.max_model_len, self.kv_pages * self.page_size) - prompt_len

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with the numbers, when this request can never be served."""
        params.validate()
        n, vocab = len(prompt_token_ids), self.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (the vocabulary), got {bad[0]}")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}) (the vocabulary), got {bad[0]}")
        bias = params.logit_bias or {}
        bad = [t for t in bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab}) (the vocabulary), got {bad[0]}")
        if len(bias) > self.max_logit_bias:
            raise ValueError(f"logit_bias has {len(bias)} entries; this server takes at most "
                             f"{self.max_logit_bias} (--max-logit-bias)")
        spec = grammar_spec(params)
        if spec is not None:
            check_grammar(spec)
        kv_tokens = self.kv_pages * self.page_size
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; the context length is {self.max_model_len}")
        if n >= kv_tokens:
            raise ValueError(f"the prompt has {n} tokens; the whole KV cache holds {kv_tokens}")
        max_new = self.max_new_tokens(n, params)
        if n + max_new > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({max_new}) is {n + max_new}, "
                f"over the context length {self.max_model_len}"
            )
        pages_alone = pages_for(n + max_new, self.page_size)
        if pages_alone > self.kv_pages:
            raise ValueError(
                f"prompt plus max_tokens needs {pages_alone * self.page_size} KV tokens, "
                f"more than the whole KV cache ({kv_tokens})"
            )
