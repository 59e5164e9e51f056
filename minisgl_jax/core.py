"""The few dataclasses every part of the engine shares: sampling parameters, requests, outputs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top logprobs per token at most: the step computes this many whenever any row asks
INT32_MAX = 2**31 - 1  # top_k, token ids and lengths travel in the step's int32 arrays
# Below it sampling is greedy, as in vLLM: logits divided by a tinier float32 overflow to inf.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for one logit_bias value: [-100, 100]
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "lark")  # SamplingParams' grammar fields, at most one set


@dataclass
class SamplingParams:
    """How to sample one request; mirrors vLLM's `SamplingParams`.

    temperature 0 (anything below GREEDY_TEMPERATURE) means greedy. top_k -1 and top_p 1.0 and
    min_p 0.0 mean "off"; a top_k at or above the vocabulary size keeps every token.
    A request without a seed gets a random one at submission, so its samples are still
    reproducible from the seed recorded on the request.

    The logits-processing controls (engine/logits_processing.py) act on the model's logits before
    sampling, in this order: `repetition_penalty` (Hugging Face's: a logit of a token in the prompt
    or the output so far is divided by it when positive, multiplied when negative; 1.0 is off),
    `frequency_penalty` and `presence_penalty` (OpenAI's, over the output so far: minus the penalty
    times the token's count, and minus the penalty once if it occurs at all), `logit_bias` (token id
    -> added to its logit), and `min_tokens` (EOS and `stop_token_ids` impossible until that many
    tokens are out). Logprobs report the model's distribution before any of them, as vLLM's do.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    # Top logprobs of each prompt token (the first has none), as vLLM's prompt_logprobs: they come
    # from the prefill, so such a request computes its whole prompt instead of reusing cached pages.
    prompt_logprobs: int | None = None
    # Grammar-constrained output (minisgl_jax/grammar), at most one: a JSON Schema's text, a regex
    # the whole output matches, a GBNF grammar (`root ::= ...`), or a Lark grammar in llguidance's
    # syntax (what tool calls with tool_choice "required" or a named function use).
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    lark: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, list):  # the workers' wire form: [[token id, bias], ...]
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias}

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and its allowed range.

        The ranges are what the step's float32 and int32 arrays hold; NaN fails every comparison.
        """
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.top_k == -1 or 1 <= self.top_k <= INT32_MAX):
            raise ValueError(f"top_k must be -1 (off) or in [1, {INT32_MAX}], got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be in [1, {INT32_MAX}], got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        bad = [t for t in self.stop_token_ids if not 0 <= t <= INT32_MAX]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {INT32_MAX}], got {bad[0]}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or not 0 <= token <= INT32_MAX:
                raise ValueError(f"logit_bias keys must be token ids in [0, {INT32_MAX}], got {token}")
            if not isinstance(bias, int | float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        if not 0 <= self.min_tokens <= INT32_MAX:
            raise ValueError(f"min_tokens must be in [0, {INT32_MAX}], got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        grammars = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        for name in grammars:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        if len(grammars) > 1:
            raise ValueError(f"{grammars[1]} cannot be combined with {grammars[0]}: give at most one of {GRAMMAR_FIELDS}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def constrained(self) -> bool:
        """Whether a grammar constrains the output: the host fills a token mask for each step."""
        return any(getattr(self, name) is not None for name in GRAMMAR_FIELDS)

    @property
    def processes_logits(self) -> bool:
        """Whether any logits-processing control is on: then the request's steps run the programs
        with that stage, and its slot keeps per-token counts on the device."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias) or self.min_tokens > 0)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"
    ERROR = "error"  # the request's step failed; RequestOutput.error says how


@dataclass
class TokenLogprob:
    """Log-probability of the chosen token and the top-n alternatives at one position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new token ids since the last output."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # with FinishReason.ERROR: what failed
    error_field: str | None = None  # with it, the request field at fault (a grammar): the client's error, not ours
    # With SamplingParams.prompt_logprobs, once (with the first output): None for the first prompt
    # token, then one TokenLogprob per prompt token.
    prompt_logprobs: list[TokenLogprob | None] | None = None
