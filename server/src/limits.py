"""Per-request limits and admission control: every request the server takes is bounded.

Each limit is a flag; a request over one gets a 400 naming the field, and a server whose queue is
full answers 503 with Retry-After instead of queueing without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisgl_jax.server.protocol import APIError

from minisgl_jax.core import MAX_LOGPROBS, SamplingParams


@dataclass
class RequestLimits:
    max_n: int = 16  # choices per request (n), and prompts x n for a batched completion
    max_tokens: int | None = None  # None: only the context length bounds max_tokens
    max_stop: int = 16  # stop strings, and stop token ids
    max_messages: int = 1024  # chat messages per request
    max_logprobs: int = MAX_LOGPROBS
    max_queued_requests: int = 1024  # choices waiting beyond the running batch
    request_timeout_s: float | None = None  # server-wide; a request's own `timeout` may only shorten it

    def validate(self) -> None:
        for name in ("max_n", "max_stop", "max_messages", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max-tokens-limit must be >= 1, got {self.max_tokens}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"--max-logprobs must be in 0..{MAX_LOGPROBS}, got {self.max_logprobs}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout_s}")

    def check(self, params: SamplingParams, num_choices: int, *, num_messages: int = 0,
              max_tokens_field: str = "max_tokens", logprobs_field: str = "logprobs") -> None:
        """Raise a 400 naming the first field of this request over its limit."""
        if num_choices > self.max_n:
            raise APIError(400, f"the request asks for {num_choices} completions (prompts x n); "
                                f"this server allows at most {self.max_n}", "n")
        if self.max_tokens is not None and params.max_tokens is not None and params.max_tokens > self.max_tokens:
            raise APIError(400, f"{max_tokens_field} is {params.max_tokens}; this server allows at most "
                                f"{self.max_tokens}", max_tokens_field)
        if len(params.stop) > self.max_stop:
            raise APIError(400, f"{len(params.stop)} stop strings; this server allows at most {self.max_stop}", "stop")
        if len(params.stop_token_ids) > self.max_stop:
            raise APIError(400, f"{len(params.stop_token_ids)} stop_token_ids; this server allows at most "
                                f"{self.max_stop}", "stop_token_ids")
        if num_messages > self.max_messages:
            raise APIError(400, f"{num_messages} messages; this server allows at most {self.max_messages}",
                           "messages")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise APIError(400, f"{params.logprobs} top logprobs asked; this server allows at most "
                                f"{self.max_logprobs}", logprobs_field)

    def timeout(self, requested_s: float | None) -> float | None:
        """The request's deadline in seconds: its own `timeout`, capped by the server's."""
        if requested_s is None:
            return self.request_timeout_s
        if self.request_timeout_s is None:
            return requested_s
        return min(requested_s, self.request_timeout_s)


def admit(in_flight: int, num_choices: int, max_running: int, limits: RequestLimits) -> None:
    """Refuse with 503 + Retry-After when taking this request would overfill the queue."""
    capacity = max_running + limits.max_queued_requests
    if in_flight + num_choices > capacity:
        raise APIError(503, f"the server is at capacity ({in_flight} requests in flight, {max_running} running "
                            f"plus {limits.max_queued_requests} queued at most); retry later",
                       kind="overloaded", headers={"Retry-After": "1"})
