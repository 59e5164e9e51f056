"""The messages between the server's processes: dataclasses on the wire as msgpack, never pickle.

Every message is encoded as a map with its class name under "type"; decoding looks the class up
in a closed table and checks every field against its annotation, so a malformed or foreign
message raises `MessageError` instead of reaching the code that acts on it.

The ways they travel (each process binds one PULL socket, its inbox; the others PUSH to it):

    API --GenerateReq/TokenizeReq/AbortReq/FlushCacheReq--> tokenizer --AddReq/AbortReq/...--> scheduler
    scheduler --DetokInit/TokenBatch--> detokenizer --TextBatch--> API
    detokenizer --AbortReq (stop string hit)--> scheduler
    scheduler --SchedulerReady/SchedulerStats/ErrorReply/FlushCacheReply--> API
    tokenizer --TokenizeReply/ErrorReply--> API
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field

import msgpack

Prompt = str | list[int]


class MessageError(ValueError):
    """A received message that is not one of ours or does not match its schema."""


@dataclass
class GenerateReq:
    """One API request: prompts (text, token ids, or chat messages) with n samples each."""

    rid: str
    prompts: list[Prompt] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None  # chat: rendered by the chat template
    chat_template_kwargs: dict[str, typing.Any] = field(default_factory=dict)
    params: dict[str, typing.Any] = field(default_factory=dict)  # SamplingParams fields
    n: int = 1


@dataclass
class TokenizeReq:
    """/tokenize (text or messages to ids) and /detokenize (ids to text)."""

    rid: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    add_special_tokens: bool = True


@dataclass
class TokenizeReply:
    rid: str
    token_ids: list[int]
    text: str


@dataclass
class NewRequest:
    """One engine request; its id is "<api id>/<choice index>"."""

    rid: str
    prompt_ids: list[int]
    params: dict[str, typing.Any]


@dataclass
class AddReq:
    """The engine requests of one API request (prompts times n): admitted or refused together."""

    rid: str  # API request id
    requests: list[NewRequest]


@dataclass
class AbortReq:
    rids: list[str]  # engine request ids


@dataclass
class FlushCacheReq:
    rid: str


@dataclass
class FlushCacheReply:
    rid: str
    pages: int


@dataclass
class DetokInit:
    """What the detokenizer needs to know of a request before its first tokens."""

    rid: str
    prompt_tail: list[int]
    stop: list[str]
    skip_special_tokens: bool
    logprobs: bool


@dataclass
class StepTokens:
    rid: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list[list[typing.Any]]  # [token id, logprob, [[id, logprob], ...]] per token
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class TokenBatch:
    outputs: list[StepTokens]


@dataclass
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass
class TokenLogprobText:
    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob]


@dataclass
class TextChunk:
    rid: str  # engine request id
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprobText]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class TextBatch:
    chunks: list[TextChunk]


@dataclass
class ErrorReply:
    """A request refused after the API accepted it (e.g. over the context length): a 400 for the client."""

    rid: str  # API request id
    message: str
    param: str | None = None
    status: int = 400


@dataclass
class SchedulerReady:
    weights_bytes: int
    kv_pages: int
    kv_tokens: int
    page_size: int
    max_running_requests: int
    max_model_len: int
    startup_seconds: float


@dataclass
class SchedulerStats:
    """The scheduler's heartbeat: sent every half second, and the readiness watchdog's input."""

    num_running: int
    num_waiting: int
    kv_pages_total: int
    kv_pages_free: int
    kv_pages_cached: int
    cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int
    num_retractions: int
    num_evicted_pages: int
    seconds_since_step: float  # since the last completed step; 0 when idle
    has_work: bool
    kv_invariant_ok: bool  # free + cached + held by requests == all pages, checked at this heartbeat


MESSAGES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        GenerateReq, TokenizeReq, TokenizeReply, NewRequest, AddReq, AbortReq, FlushCacheReq, FlushCacheReply, DetokInit,
        StepTokens, TokenBatch, TopLogprob, TokenLogprobText, TextChunk, TextBatch, ErrorReply, SchedulerReady,
        SchedulerStats,
    )
}


def encode(message: typing.Any) -> bytes:
    return msgpack.packb(_to_wire(message))


@functools.cache
def _schema(cls: type) -> dict[str, typing.Any]:
    """Field name -> type of a message class; evaluated once, as messages travel every step."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _to_wire(value: typing.Any) -> typing.Any:
    if type(value).__name__ in MESSAGES:
        wire = {"type": type(value).__name__}
        wire.update({name: _to_wire(getattr(value, name)) for name in _schema(type(value))})
        return wire
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def decode(data: bytes) -> typing.Any:
    """The message in `data`, or MessageError naming what is wrong with it."""
    try:
        wire = msgpack.unpackb(data, strict_map_key=True)
    except Exception as err:
        raise MessageError(f"not msgpack ({type(err).__name__}: {err})") from None
    return _from_wire(wire, "message")


def _from_wire(wire: typing.Any, where: str, expected: type | None = None) -> typing.Any:
    if not isinstance(wire, dict) or wire.get("type") not in MESSAGES:
        raise MessageError(f"{where}: not a known message type")
    cls = MESSAGES[wire["type"]]
    if expected is not None and cls is not expected:
        raise MessageError(f"{where}: expected {expected.__name__}, got {cls.__name__}")
    schema = _schema(cls)
    if len(wire) != len(schema) + 1:
        extra = set(wire) - set(schema) - {"type"}
        if extra:
            raise MessageError(f"{where}: unknown fields {sorted(extra)} in {cls.__name__}")
    values = {}
    for name, hint in schema.items():
        if name not in wire:
            raise MessageError(f"{where}: {cls.__name__} lacks field {name!r}")
        values[name] = _check(wire[name], hint, cls.__name__)
    return cls(**values)


def _check(value: typing.Any, annotation: typing.Any, where: str) -> typing.Any:
    """`value` converted to `annotation` (nested messages), or MessageError."""
    if type(value) is annotation:  # the common case, first: most fields are plain str/int/bool
        return value
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check(value, option, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {type(value).__name__} is not {annotation}")
    if annotation is type(None):
        if value is not None:
            raise MessageError(f"{where}: expected None")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(annotation)
        if item in (int, str) and all(type(v) is item for v in value):
            return value
        return [_check(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected a map, got {type(value).__name__}")
        key_type, item = typing.get_args(annotation)
        return {_check(k, key_type, where): _check(v, item, where) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _from_wire(value, where, annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise MessageError(f"{where}: expected {annotation.__name__}, got bool")
    if not isinstance(value, annotation):
        raise MessageError(f"{where}: expected {annotation.__name__}, got {type(value).__name__}")
    return value
