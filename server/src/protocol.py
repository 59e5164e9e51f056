"""The OpenAI request schemas (and our native /generate), and their mapping to SamplingParams.

Unknown fields are refused (extra="forbid"), and so are known OpenAI fields this server does not
implement, by name: a parameter is honoured or refused, never silently ignored. Every number is
bounded by what the engine holds (int32 token ids and lengths, finite floats), and every value by
what msgpack carries to the workers, so nothing a client sends can fail past validation.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from minisgl_jax.server.structured import grammar_fields, tool_call_grammar
from minisgl_jax.server.tool_parsers import ToolCallFormat
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from minisgl_jax.core import INT32_MAX, MAX_LOGPROBS, SamplingParams

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # the engine also checks it against the vocabulary
MAX_NESTING = 32  # lists and objects within a field: more than any request needs, far from the recursion limit


class APIError(Exception):
    """An error for the client, with its HTTP status and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class StrictModel(BaseModel):
    """Refuses unknown fields, NaN and infinities, and any value the workers could not be sent."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _fits_the_wire(cls, value: Any) -> Any:
        check_wire_value(value)
        return value


def neutral_only(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Pass a field only at its default, the value that asks for nothing: for SGLang's fields that
    sglang-router adds to every body it forwards, where the other value asks what we do not do."""
    neutral = model.model_fields[info.field_name].default
    if value != neutral:
        raise ValueError(f"{json.dumps(value)} is not supported by this server; "
                         f"omit it or set it to {json.dumps(neutral)}")
    return value


def check_wire_value(value: Any, depth: int = 0) -> None:
    """Raise ValueError for what msgpack cannot carry: text that is not valid Unicode (a lone UTF-16
    surrogate), integers beyond 64 bits, nesting past MAX_NESTING. Nested models check themselves."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as err:
            raise ValueError(f"text must be valid Unicode: {err.reason} (character {err.start})") from None
    elif isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise ValueError(f"integers must fit in 64 bits, got {value}")
    elif isinstance(value, list | dict):
        if depth == MAX_NESTING:
            raise ValueError(f"lists and objects may nest at most {MAX_NESTING} levels deep")
        for item in (value if isinstance(value, list) else [*value.keys(), *value.values()]):
            check_wire_value(item, depth + 1)


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text


class ToolCallItem(StrictModel):
    """A call the assistant made, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool message's: the call it answers
    reasoning_content: str | None = None  # an assistant's, as this server returns it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates read it: tool call arguments as objects, as Hugging Face's
        templates expect; arguments that are not a JSON object are a 400 naming them."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        for name in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                field = f"messages[{index}].tool_calls[{j}].function.arguments"
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError as err:
                    raise APIError(400, f"{field} is not valid JSON: {err}", field) from None
                if not isinstance(arguments, dict):
                    raise APIError(400, f"{field} must be a JSON object", field)
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        return message


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: the function takes no arguments
    strict: bool | None = None  # either value: a forced call's arguments always match the schema


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(StrictModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # either value: the output always matches the schema


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def checked_grammar(
    response_format: ResponseFormat | None, regex: str | None, ebnf: str | None, json_schema: str | dict | None,
    prefix: str = "",
) -> dict[str, str]:
    """The SamplingParams grammar field these fields ask for ({} for none); a 400 naming a bad one."""
    described = response_format.model_dump(by_alias=True) if response_format else None
    try:
        return grammar_fields(described, regex, ebnf, json_schema, prefix)
    except ValueError as err:
        raise APIError(400, str(err), str(err).split()[0]) from None


def token_bias(bias: dict[str, float] | None, field: str) -> dict[int, float] | None:
    """logit_bias with its keys, token ids written as JSON strings, as ints; a 400 naming `field` otherwise."""
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        bad = next(t for t in bias if not t.strip().lstrip("+-").isdigit())
        raise APIError(400, f"{field} keys must be token ids, got {bad!r}", field) from None


class SamplingFields(StrictModel):
    """The fields both OpenAI endpoints share, plus the vLLM/SGLang extensions people send."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, le=INT32_MAX)  # 0 is refused by SamplingParams.validate
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1)  # bounded by --max-n
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are strings) -> bias in [-100, 100]
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    # Structured outputs (at most one): OpenAI's response_format, and SGLang's regex, ebnf (GBNF)
    # and json_schema (a JSON Schema, as text or an object).
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    user: str | None = None
    timeout: float | None = Field(default=None, gt=0)  # seconds; vLLM/SGLang-style extension
    no_stop_trim: bool = False  # SGLang's; true (keep the stop string in the text) is refused
    return_hidden_states: bool = False  # SGLang's; true is refused

    @field_validator("no_stop_trim", "return_hidden_states")
    @classmethod
    def _sglang_neutral(cls, value: bool, info: ValidationInfo) -> bool:
        return neutral_only(cls, value, info)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
        grammar: dict[str, str] | None = None,
    ) -> SamplingParams:
        """`grammar`: the grammar field to set, by default the one the structured-output fields ask for."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if grammar is None:
            grammar = checked_grammar(self.response_format, self.regex, self.ebnf, self.json_schema)
        params = SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            max_tokens=max_tokens, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, seed=self.seed, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=token_bias(self.logit_bias, "logit_bias"), min_tokens=self.min_tokens,
            prompt_logprobs=prompt_logprobs, **grammar,
        )
        try:
            params.validate()
        except ValueError as err:
            raise APIError(400, str(err), str(err).split()[0]) from None
        return params


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    continue_final_message: bool = False  # SGLang's; true is refused
    # SGLang's, where --reasoning-parser runs: reasoning in reasoning_content (false: left in the
    # content), and streamed as it comes (false: in one delta once it has ended).
    separate_reasoning: bool = True
    stream_reasoning: bool = True

    @field_validator("continue_final_message")
    @classmethod
    def _chat_neutral(cls, value: bool, info: ValidationInfo) -> bool:
        return neutral_only(cls, value, info)

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first set field that this server cannot honour."""
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise APIError(400, "tools must have distinct function names", "tools")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice names function {self.tool_choice.function.name!r}, "
                                f"which is not in tools", "tool_choice")

    @property
    def uses_tools(self) -> bool:
        """Whether the model is offered the tools (and its output parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_functions(self) -> list[dict[str, Any]]:
        """The functions the output must call (tool_choice "required": any of them; named: that one)."""
        if self.tool_choice == "required":
            return [tool.function.model_dump(exclude_none=True) for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            return [t.function.model_dump(exclude_none=True) for t in self.tools if t.function.name == name]
        return []

    def to_sampling_params(self, tool_format: ToolCallFormat | None = None) -> SamplingParams:
        """`tool_format`: the family's tool-call format (--tool-call-parser), None where none is known."""
        self.refuse_unsupported()
        if self.uses_tools and tool_format is None:
            raise APIError(400, "tools need a tool-call parser for this model: start the server with "
                                "--tool-call-parser", "tools")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        grammar = checked_grammar(self.response_format, self.regex, self.ebnf, self.json_schema)
        forced = self.forced_functions()
        if forced:
            if grammar:
                raise APIError(400, "tool_choice that forces a call cannot be combined with response_format, "
                                    "regex, ebnf or json_schema", "tool_choice")
            try:
                parallel = self.parallel_tool_calls and self.tool_choice == "required"  # a named function: one call
                grammar = {"lark": tool_call_grammar(tool_format, forced, parallel)}
            except ValueError as err:
                raise APIError(400, str(err), str(err).split()[0]) from None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, logprobs, grammar=grammar)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _token_ids_in_range(cls, prompt: str | list[Any]) -> str | list[Any]:
        """TokenId's range, checked here: a TokenId in the union would name a union member in its errors."""
        rows = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        ids = [t for row in rows if isinstance(row, list) for t in row if isinstance(t, int)]
        bad = [t for t in ids if not 0 <= t <= INT32_MAX]
        if bad:
            raise ValueError(f"token ids must be in [0, {INT32_MAX}], got {bad[0]}")
        return prompt

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first set field that this server cannot honour."""
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of other than n is not supported by this server", "best_of")

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt or any(len(p) == 0 for p in prompt):
            raise APIError(400, "prompt must not be empty", "prompt")
        return list(prompt)

    def to_sampling_params(self) -> SamplingParams:
        """With echo and logprobs, the prompt's tokens get logprobs too (from the prefill)."""
        self.refuse_unsupported()
        prompt_logprobs = self.logprobs if self.echo else None
        return self.sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class NativeSamplingParams(StrictModel):
    """/generate's sampling_params, named as SGLang's native API names them."""

    max_new_tokens: int | None = Field(default=128, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, le=INT32_MAX)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None
    min_new_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    regex: str | None = None  # structured outputs, at most one
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None


class GenerateRequest(StrictModel):
    text: str | None = None
    input_ids: list[TokenId] | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False
    timeout: float | None = Field(default=None, gt=0)
    # SGLang's native fields that sglang-router adds to every body it forwards.
    model: str | None = None
    return_text_in_logprobs: bool = False  # either value: /generate returns no logprobs
    no_logs: bool = False  # either value: no request's text is ever logged
    log_metrics: bool = True  # false (leave the request out of /metrics) is refused
    return_hidden_states: bool = False
    background: bool = False
    return_bytes: bool = False
    return_entropy: bool = False

    @field_validator("log_metrics", "return_hidden_states", "background", "return_bytes", "return_entropy")
    @classmethod
    def _native_neutral(cls, value: bool, info: ValidationInfo) -> bool:
        return neutral_only(cls, value, info)

    def prompt(self) -> str | list[int]:
        if (self.text is None) == (self.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids", "text")
        prompt = self.text if self.text is not None else self.input_ids
        if not prompt:
            raise APIError(400, "the prompt must not be empty", "text" if self.text is not None else "input_ids")
        return prompt

    def to_sampling_params(self) -> SamplingParams:
        p = self.sampling_params
        stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        params = SamplingParams(
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, max_tokens=p.max_new_tokens,
            stop=stop, stop_token_ids=list(p.stop_token_ids or []), ignore_eos=p.ignore_eos, seed=p.seed,
            skip_special_tokens=p.skip_special_tokens, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
            logit_bias=token_bias(p.logit_bias, "sampling_params.logit_bias"), min_tokens=p.min_new_tokens,
            **checked_grammar(None, p.regex, p.ebnf, p.json_schema, "sampling_params."),
        )
        try:
            params.validate()
        except ValueError as err:
            name = str(err).split()[0].replace("min_tokens", "min_new_tokens").replace("max_tokens", "max_new_tokens")
            raise APIError(400, str(err), f"sampling_params.{name}") from None
        return params


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenId]
