"""The HTTP API: OpenAI-compatible endpoints, native /generate, health, metrics and admin routes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from minisgl_jax.server import responses
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.limits import RequestLimits, admit
from minisgl_jax.server.messages import (
    AbortReq,
    FlushCacheReq,
    GenerateReq,
    TextChunk,
    TokenizeReq,
)
from minisgl_jax.server.middleware import APIKeyCheck, BodyLimit
from minisgl_jax.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from starlette.exceptions import HTTPException

from minisgl_jax.core import SamplingParams

logger = logging.getLogger(__name__)

# The scheduler's heartbeat thread beats every 0.5 s: this long a silence means the process is
# stopped or hung hard (a pass that runs long still beats; --watchdog-timeout judges those).
HEARTBEAT_TIMEOUT_S = 10.0


@dataclass
class APIConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    watchdog_timeout_s: float = 120.0
    # Why the launcher cannot serve now (a worker process has exited, the server is shutting
    # down), or None.
    launcher_problem: Callable[[], str | None] = lambda: None
    allow_origins: list[str] = field(default_factory=list)
    limits: RequestLimits = field(default_factory=RequestLimits)


def build_app(client: EngineClient, config: APIConfig) -> FastAPI:
    app = FastAPI(title="minisgl-jax", description="OpenAI-compatible LLM server")
    live: dict[str, int] = {}  # API request id -> number of engine requests, for /abort/{id}

    # ---- errors: OpenAI-shaped bodies, 400 for validation (never 422) ------------------------

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        client.metrics.errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        # The deepest error: a union field's value fails every member, and the member it was meant for goes furthest.
        error = max(err.errors(), key=lambda e: len(e["loc"]))
        param = body_path(error, err.body)
        message = f"{param}: {error['msg']}" if param else f"the request body must be a JSON object: {error['msg']}"
        client.metrics.errors.labels("400").inc()
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        client.metrics.errors.labels(str(err.status_code)).inc()
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        """A bug, not bad input: an OpenAI-shaped 500 for the client; Starlette logs the traceback."""
        client.metrics.errors.labels("500").inc()
        return JSONResponse(APIError(500, f"internal server error ({type(err).__name__})").body(), status_code=500)

    # ---- health and metrics ------------------------------------------------------------------

    def not_ready_reason() -> str | None:
        """Why a request would not be served now, or None: /health's check (vLLM's and SGLang's
        meaning), and the gate of every route that needs the engine."""
        problem = config.launcher_problem()
        if problem is not None:
            return problem
        if client.ready is None:
            return "the model is still loading and compiling"
        silent = time.monotonic() - client.stats_at
        if silent > HEARTBEAT_TIMEOUT_S:
            return f"the scheduler process has sent no heartbeat for {silent:.0f}s: it is stopped or hung"
        stats = client.stats
        if stats is not None and stats.busy_s > config.watchdog_timeout_s:
            doing = "has waited for a step program to compile" if stats.compiling else "has made no progress"
            return (f"the scheduler {doing} for {stats.busy_s:.0f}s, longer than --watchdog-timeout "
                    f"{config.watchdog_timeout_s:g}s")
        return None

    def require_ready() -> None:
        reason = not_ready_reason()
        if reason is not None:
            raise APIError(503, f"the server is not ready: {reason}", kind="service_unavailable")

    @app.get("/health")
    @app.get("/health/ready")
    async def health() -> JSONResponse:
        """200 only when a request would be served now; else 503 with the reason."""
        reason = not_ready_reason()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/health/live")
    async def liveness() -> JSONResponse:
        """Liveness: the API process answers (the launcher ends the server if a worker dies)."""
        return JSONResponse({"status": "alive"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(client.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        max_len = client.ready.max_model_len if client.ready else None
        card = {"id": config.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "minisgl-jax", "max_model_len": max_len}
        return {"object": "list", "data": [card]}

    # ---- generation ----------------------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != config.served_model_name:
            raise APIError(400, f"model {name!r} is not served here; this server serves "
                                f"{config.served_model_name!r}", "model")

    async def run(
        request: Request, message: GenerateReq, num_choices: int, stream: bool, timeout_s: float | None,
        render_stream: Callable[[TextChunk | None, responses.Choices], list[str]],
        render_final: Callable[[responses.Choices], dict[str, Any]],
    ) -> Response:
        """Send one generation request and answer it, streamed (SSE) or whole, within its timeout."""
        require_ready()
        admit(sum(live.values()), num_choices, client.ready.max_running_requests, config.limits)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        live[message.rid] = num_choices
        chunks = client.generate(message, num_choices)
        watcher = asyncio.create_task(abort_on_disconnect(request, message.rid, num_choices))
        choices = responses.Choices(num_choices, message.n)

        async def end() -> None:
            watcher.cancel()
            live.pop(message.rid, None)
            await chunks.aclose()  # aborts every choice that has not finished

        try:
            first = await next_chunk(chunks, deadline)
            if not stream:
                choices.add(first)
                async for chunk in until(chunks, deadline):
                    choices.add(chunk)
        except TimeoutError:
            await end()
            raise timed_out(timeout_s) from None
        except BaseException:
            await end()
            raise
        if not stream:
            await end()
            return JSONResponse(render_final(choices))

        async def events() -> AsyncIterator[str]:
            try:
                for line in render_stream(None, choices):
                    yield line
                choices.add(first)
                for line in render_stream(first, choices):
                    yield line
                try:
                    async for chunk in until(chunks, deadline):
                        choices.add(chunk)
                        for line in render_stream(chunk, choices):
                            yield line
                except TimeoutError:
                    yield stream_error(timed_out(timeout_s))
                except APIError as err:  # the request failed after its first token: say so in the stream
                    yield stream_error(err)
                yield "data: [DONE]\n\n"
            finally:
                await end()

        return StreamingResponse(events(), media_type="text/event-stream")

    def stream_error(err: APIError) -> str:
        client.metrics.errors.labels(str(err.status)).inc()
        return responses.sse(err.body())

    def timed_out(timeout_s: float | None) -> APIError:
        return APIError(504, f"the request did not finish within its timeout of {timeout_s:g}s and was aborted",
                        "timeout", kind="timeout_error")

    async def abort_on_disconnect(request: Request, rid: str, num_choices: int) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        logger.info("client of %s disconnected: aborting it", rid)
        client.send(AbortReq([f"{rid}/{i}" for i in range(num_choices)]))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        params = body.to_sampling_params()
        config.limits.check(params, body.n, num_messages=len(body.messages), logprobs_field="top_logprobs",
                            max_tokens_field="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        message = GenerateReq(rid, messages=messages, chat_template_kwargs=body.chat_template_kwargs,
                              params=_wire(params), n=body.n)
        view = responses.ChatView(rid, config.served_model_name, body.stream_options)
        return await run(request, message, body.n, body.stream, config.limits.timeout(body.timeout),
                         view.stream, view.final)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        params = body.to_sampling_params()
        prompts = body.prompts()
        config.limits.check(params, len(prompts) * body.n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        message = GenerateReq(rid, prompts=prompts, params=_wire(params), n=body.n)
        view = responses.CompletionView(rid, config.served_model_name, body.stream_options)
        return await run(request, message, len(prompts) * body.n, body.stream, config.limits.timeout(body.timeout),
                         view.stream, view.final)

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        prompt = body.prompt()
        params = body.to_sampling_params()
        config.limits.check(params, 1, max_tokens_field="sampling_params.max_new_tokens")
        rid = f"gen-{uuid.uuid4().hex}"
        message = GenerateReq(rid, prompts=[prompt], params=_wire(params), n=1)
        view = responses.NativeView(rid)
        return await run(request, message, 1, body.stream, config.limits.timeout(body.timeout), view.stream,
                         view.final)

    # ---- tokens and admin ----------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        require_ready()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages] if body.messages else None
        rid = f"tok-{uuid.uuid4().hex}"
        reply = await client.call(rid, TokenizeReq(rid, text=body.prompt, messages=messages,
                                                   add_special_tokens=body.add_special_tokens))
        return {"tokens": reply.token_ids, "count": len(reply.token_ids), "max_model_len": client.ready.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        require_ready()
        rid = f"detok-{uuid.uuid4().hex}"
        reply = await client.call(rid, TokenizeReq(rid, token_ids=body.tokens))
        return {"prompt": reply.text}

    @app.post("/abort/{rid}")
    async def abort(rid: str) -> dict[str, Any]:
        if rid not in live:
            raise APIError(404, f"no running request with id {rid!r}", "rid")
        client.send(AbortReq([f"{rid}/{i}" for i in range(live[rid])]))
        return {"id": rid, "aborted": True}

    @app.post("/flush_cache")
    async def flush_cache() -> dict[str, Any]:
        require_ready()
        rid = f"flush-{uuid.uuid4().hex}"
        reply = await client.call(rid, FlushCacheReq(rid))
        return {"flushed_pages": reply.pages}

    if config.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.allow_origins, allow_methods=["*"],
                           allow_headers=["*"])
    if config.api_key:
        app.add_middleware(APIKeyCheck, api_key=config.api_key)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


async def next_chunk(chunks: AsyncIterator[TextChunk], deadline: float | None) -> TextChunk:
    """The next chunk, or TimeoutError at `deadline` (event-loop time; None waits for ever)."""
    async with asyncio.timeout_at(deadline):
        return await anext(chunks)


async def until(chunks: AsyncIterator[TextChunk], deadline: float | None) -> AsyncIterator[TextChunk]:
    while True:
        try:
            chunk = await next_chunk(chunks, deadline)
        except StopAsyncIteration:
            return
        yield chunk


def body_path(error: dict[str, Any], body: Any) -> str | None:
    """A validation error's location as a dotted path into the request body, without the names of
    the union members that pydantic puts in it."""
    loc = error["loc"]
    if loc[:1] != ("body",):  # a path or query parameter
        return ".".join(str(part) for part in loc)
    parts, value = [], body
    for i, part in enumerate(loc[1:], start=1):
        if isinstance(value, dict) and part in value or isinstance(value, list) and isinstance(part, int):
            parts.append(part)
            value = value[part]
        elif error["type"] == "missing" and i == len(loc) - 1:
            parts.append(part)
    return ".".join(str(part) for part in parts) or None


def _wire(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as the plain map that travels in a GenerateReq."""
    return dataclasses.asdict(params)
