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
    messages: list[dict[str, typing.Any]] | None = None  # chat: rendered by the chat template
    chat_template_kwargs: dict[str, typing.Any] = field(default_factory=dict)
    tools: list[dict[str, typing.Any]] | None = None  # chat: OpenAI's tools, for the chat template
    params: dict[str, typing.Any] = field(default_factory=dict)  # SamplingParams fields
    n: int = 1
    echo: bool = False  # completions: each choice's text starts with its prompt


@dataclass
class TokenizeReq:
    """/tokenize (text or messages to ids) and /detokenize (ids to text)."""

    rid: str
    text: str | None = None
    messages: list[dict[str, typing.Any]] | None = None
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
    echo_text: str | None = None  # the prompt as the choice's text begins with it (echo)


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
    echo_text: str | None = None


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
    # Once, with echo and logprobs: [token id, logprob or None (the first), [[id, logprob], ...]] per prompt token
    prompt_logprobs: list[list[typing.Any]] | None = None
    error: str | None = None  # with finish reason "error": what failed
    error_field: str | None = None  # and the request field at fault, when it is the request's (a grammar)


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
    logprob: float | None  # None: the first prompt token of an echo, which nothing predicts
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
    error: str | None = None
    error_field: str | None = None


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
    """The scheduler's heartbeat, sent every half second by a thread of its own: /health's input.

    The figures are as of the loop's latest pass; busy_s, compiling and has_work are as of sending.
    """

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
    busy_s: float  # how long the loop's current pass (a step, a message) has run; about 0 between passes
    has_work: bool
    kv_invariant_ok: bool  # free + cached + held by requests == all pages, checked at the latest pass
    compiling: bool  # the current pass waits for a step program to compile


MESSAGES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        GenerateReq, TokenizeReq, TokenizeReply, NewRequest, AddReq, AbortReq, FlushCacheReq, FlushCacheReply, DetokInit,
        StepTokens, TokenBatch, TopLogprob, TokenLogprobText, TextChunk, TextBatch, ErrorReply, SchedulerReady,
        SchedulerStats,
    )
}


Reader = typing.Callable[[typing.Any, str], typing.Any]
Writer = typing.Callable[[typing.Any], typing.Any]


def encode(message: typing.Any) -> bytes:
    return msgpack.packb(_message_writer(type(message))(message))


def decode(data: bytes) -> typing.Any:
    """The message in `data`, or MessageError naming what is wrong with it."""
    try:
        wire = msgpack.unpackb(data, strict_map_key=True)
    except Exception as err:
        raise MessageError(f"not msgpack ({type(err).__name__}: {err})") from None
    return _from_wire(wire, "message")


# Readers and writers are built once per type from the annotations, not re-derived per value:
# messages cross the sockets every step, and the per-value type inspection was most of the API's
# and the detokenizer's time under load.


@functools.cache
def _schema(cls: type) -> dict[str, typing.Any]:
    """Field name -> type of a message class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _builder(cls: type) -> typing.Callable[[dict, str], typing.Any]:
    """Checks a wire map's fields against `cls`'s schema and builds the message."""
    fields = tuple((name, _reader(hint)) for name, hint in _schema(cls).items())
    size, name_of_cls = len(fields) + 1, cls.__name__

    def build(wire: dict, where: str) -> typing.Any:
        if len(wire) != size:
            extra = set(wire) - set(_schema(cls)) - {"type"}
            if extra:
                raise MessageError(f"{where}: unknown fields {sorted(extra)} in {name_of_cls}")
        try:
            return cls(*[read(wire[name], name_of_cls) for name, read in fields])
        except KeyError as missing:
            raise MessageError(f"{where}: {name_of_cls} lacks field {missing}") from None

    return build


def _from_wire(wire: typing.Any, where: str, expected: type | None = None) -> typing.Any:
    kind = wire.get("type") if isinstance(wire, dict) else None
    cls = MESSAGES.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageError(f"{where}: not a known message type")
    if expected is not None and cls is not expected:
        raise MessageError(f"{where}: expected {expected.__name__}, got {cls.__name__}")
    return _builder(cls)(wire, where)


def _fail(where: str, expected: str, value: typing.Any) -> typing.NoReturn:
    raise MessageError(f"{where}: expected {expected}, got {type(value).__name__}")


@functools.cache
def _reader(annotation: typing.Any) -> Reader:
    """A function that checks a wire value against `annotation` and builds nested messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        options = [_reader(option) for option in args]

        def read_union(value: typing.Any, where: str) -> typing.Any:
            for read in options:
                try:
                    return read(value, where)
                except MessageError:
                    continue
            raise MessageError(f"{where}: {type(value).__name__} is not {annotation}")

        return read_union
    if annotation is type(None):
        def read_none(value: typing.Any, where: str) -> None:
            if value is not None:
                raise MessageError(f"{where}: expected None")

        return read_none
    if origin is list:
        (item,) = args
        read_item = _reader(item)
        if item in (int, str):
            def read_plain_list(value: typing.Any, where: str) -> list:
                if type(value) is not list:
                    _fail(where, "a list", value)
                for v in value:
                    if type(v) is not item:
                        _fail(where, item.__name__, v)
                return value

            return read_plain_list

        def read_list(value: typing.Any, where: str) -> list:
            if type(value) is not list:
                _fail(where, "a list", value)
            return [read_item(v, where) for v in value]

        return read_list
    if origin is dict:
        read_key, read_value = _reader(args[0]), _reader(args[1])

        def read_dict(value: typing.Any, where: str) -> dict:
            if type(value) is not dict:
                _fail(where, "a map", value)
            return {read_key(k, where): read_value(v, where) for k, v in value.items()}

        return read_dict
    if dataclasses.is_dataclass(annotation):
        return lambda value, where: _from_wire(value, where, annotation)
    if annotation is float:
        def read_float(value: typing.Any, where: str) -> float:
            if type(value) is float:
                return value
            if type(value) is int:
                return float(value)
            _fail(where, "float", value)

        return read_float

    def read_plain(value: typing.Any, where: str) -> typing.Any:
        if type(value) is not annotation:  # exact: a bool is no int here
            _fail(where, annotation.__name__, value)
        return value

    return read_plain


@functools.cache
def _message_writer(cls: type) -> Writer:
    """The wire map of a message: plain fields as they are, nested messages converted."""
    name = cls.__name__
    if name not in MESSAGES:
        raise TypeError(f"{name} is not a message type")
    fields = tuple((field_name, _writer(hint)) for field_name, hint in _schema(cls).items())

    def write(message: typing.Any) -> dict[str, typing.Any]:
        wire = {"type": name}
        for field_name, convert in fields:
            value = getattr(message, field_name)
            wire[field_name] = value if convert is None else convert(value)
        return wire

    return write


@functools.cache
def _writer(annotation: typing.Any) -> Writer | None:
    """How to put a value of `annotation` on the wire; None when it goes as it is (no messages in it)."""
    if dataclasses.is_dataclass(annotation):
        return lambda value: _message_writer(type(value))(value)
    if typing.get_origin(annotation) is list:
        convert = _writer(typing.get_args(annotation)[0])
        return None if convert is None else (lambda value: [convert(v) for v in value])
    return None
