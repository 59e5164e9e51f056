"""The HTTP API: OpenAI-compatible endpoints, native /generate, tokens and admin routes; health
(`health.py`) and errors (`errors.py`) beside it."""

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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from minisgl_jax.server import responses
from minisgl_jax.server.chat_output import ChatParsing
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.errors import install_error_handlers
from minisgl_jax.server.health import Readiness
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
from minisgl_jax.server.reasoning import REASONING_FORMATS
from minisgl_jax.server.structured import grammar_after_reasoning
from minisgl_jax.server.tool_parsers import FORMATS
from minisgl_jax.server.worker_info import ModelCard, WorkerInfo

from minisgl_jax.core import SamplingParams

logger = logging.getLogger(__name__)

# What sglang-router puts in the model field of a chat request that names no model.
ROUTER_NO_MODEL = "unknown"

RenderStream = Callable[[TextChunk | None, responses.Choices], list[str]]
RenderFinal = Callable[[responses.Choices], dict[str, Any]]


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
    model_card: ModelCard = field(default_factory=ModelCard)  # what /server_info and /model_info tell a router
    tool_call_parser: str | None = None  # the family's tool-call format; None: tools are refused
    reasoning_parser: str | None = None


def build_app(client: EngineClient, config: APIConfig) -> FastAPI:
    app = FastAPI(title="minisgl-jax", description="OpenAI-compatible LLM server")
    install_error_handlers(app, client.metrics)
    readiness = Readiness(client, config.watchdog_timeout_s, config.launcher_problem)
    readiness.install(app)
    Routes(client, config, readiness).install(app)
    WorkerInfo(client, config.served_model_name, config.model_card).install(app)
    if config.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.allow_origins, allow_methods=["*"],
                           allow_headers=["*"])
    if config.api_key:
        app.add_middleware(APIKeyCheck, api_key=config.api_key)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


class Routes:
    """The engine's routes, over the client, the config and the requests in flight."""

    def __init__(self, client: EngineClient, config: APIConfig, readiness: Readiness) -> None:
        self.client, self.config, self.readiness = client, config, readiness
        self.live: dict[str, int] = {}  # API request id -> number of engine requests, for /abort/{id}

    def install(self, app: FastAPI) -> None:
        for path, endpoint, method in (
            ("/metrics", self.metrics, "GET"), ("/v1/models", self.models, "GET"),
            ("/v1/chat/completions", self.chat_completions, "POST"), ("/v1/completions", self.completions, "POST"),
            ("/generate", self.generate, "POST"), ("/tokenize", self.tokenize, "POST"),
            ("/detokenize", self.detokenize, "POST"), ("/abort/{rid}", self.abort, "POST"),
            ("/flush_cache", self.flush_cache, "POST"),
        ):
            app.add_api_route(path, endpoint, methods=[method])

    # ---- metrics and models --------------------------------------------------------------------

    async def metrics(self) -> Response:
        return Response(self.client.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict[str, Any]:
        max_len = self.client.ready.max_model_len if self.client.ready else None
        card = {"id": self.config.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "minisgl-jax", "max_model_len": max_len}
        return {"object": "list", "data": [card]}

    # ---- generation ----------------------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        tool_format = FORMATS.get(self.config.tool_call_parser or "")
        params = body.to_sampling_params(tool_format)
        thinks = REASONING_FORMATS.get(self.config.reasoning_parser or "")
        if thinks is not None and params.constrained and body.chat_template_kwargs.get("enable_thinking") is not False:
            params = grammar_after_reasoning(params, thinks)
        limits = self.config.limits
        limits.check(params, body.n, num_messages=len(body.messages), logprobs_field="top_logprobs",
                     max_tokens_field="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        messages = [m.to_template(i) for i, m in enumerate(body.messages)]
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.uses_tools else None
        message = GenerateReq(rid, messages=messages, chat_template_kwargs=body.chat_template_kwargs,
                              tools=tools, params=_wire(params), n=body.n)
        reasoning = thinks if body.separate_reasoning else None
        parsing = ChatParsing(tool_format if body.uses_tools else None, bool(body.forced_functions()), reasoning,
                              body.stream_reasoning)
        view = responses.ChatView(rid, self.config.served_model_name, body.stream_options, parsing)
        return await self.run(request, message, body.n, body.stream, limits.timeout(body.timeout),
                              view.stream, view.final)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        params = body.to_sampling_params()
        prompts = body.prompts()
        self.config.limits.check(params, len(prompts) * body.n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        message = GenerateReq(rid, prompts=prompts, params=_wire(params), n=body.n, echo=body.echo)
        view = responses.CompletionView(rid, self.config.served_model_name, body.stream_options)
        return await self.run(request, message, len(prompts) * body.n, body.stream,
                              self.config.limits.timeout(body.timeout), view.stream, view.final)

    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompt = body.prompt()
        params = body.to_sampling_params()
        self.config.limits.check(params, 1, max_tokens_field="sampling_params.max_new_tokens")
        rid = f"gen-{uuid.uuid4().hex}"
        message = GenerateReq(rid, prompts=[prompt], params=_wire(params), n=1)
        view = responses.NativeView(rid)
        return await self.run(request, message, 1, body.stream, self.config.limits.timeout(body.timeout),
                              view.stream, view.final)

    def check_model(self, name: str | None) -> None:
        served = self.config.served_model_name
        if name not in (None, served, ROUTER_NO_MODEL):
            raise APIError(400, f"model {name!r} is not served here; this server serves {served!r}", "model")

    async def run(
        self, request: Request, message: GenerateReq, num_choices: int, stream: bool, timeout_s: float | None,
        render_stream: RenderStream, render_final: RenderFinal,
    ) -> Response:
        """Send one generation request and answer it, streamed (SSE) or whole, within its timeout."""
        self.readiness.require()
        admit(sum(self.live.values()), num_choices, self.client.ready.max_running_requests, self.config.limits)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        self.live[message.rid] = num_choices
        chunks = self.client.generate(message, num_choices)
        watcher = asyncio.create_task(self.abort_on_disconnect(request, message.rid, num_choices))
        choices = responses.Choices(num_choices, message.n)

        async def end() -> None:
            watcher.cancel()
            self.live.pop(message.rid, None)
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
                    yield self.stream_error(timed_out(timeout_s))
                except APIError as err:  # the request failed after its first token: say so in the stream
                    yield self.stream_error(err)
                yield "data: [DONE]\n\n"
            finally:
                await end()

        return StreamingResponse(events(), media_type="text/event-stream")

    def stream_error(self, err: APIError) -> str:
        self.client.metrics.errors.labels(str(err.status)).inc()
        return responses.sse(err.body())

    async def abort_on_disconnect(self, request: Request, rid: str, num_choices: int) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        logger.info("client of %s disconnected: aborting it", rid)
        self.client.send(AbortReq([f"{rid}/{i}" for i in range(num_choices)]))

    # ---- tokens and admin ----------------------------------------------------------------------

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        self.readiness.require()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        messages = [m.to_template(i) for i, m in enumerate(body.messages)] if body.messages else None
        rid = f"tok-{uuid.uuid4().hex}"
        reply = await self.client.call(rid, TokenizeReq(rid, text=body.prompt, messages=messages,
                                                        add_special_tokens=body.add_special_tokens))
        return {"tokens": reply.token_ids, "count": len(reply.token_ids),
                "max_model_len": self.client.ready.max_model_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        self.readiness.require()
        rid = f"detok-{uuid.uuid4().hex}"
        reply = await self.client.call(rid, TokenizeReq(rid, token_ids=body.tokens))
        return {"prompt": reply.text}

    async def abort(self, rid: str) -> dict[str, Any]:
        if rid not in self.live:
            raise APIError(404, f"no running request with id {rid!r}", "rid")
        self.client.send(AbortReq([f"{rid}/{i}" for i in range(self.live[rid])]))
        return {"id": rid, "aborted": True}

    async def flush_cache(self) -> dict[str, Any]:
        self.readiness.require()
        rid = f"flush-{uuid.uuid4().hex}"
        reply = await self.client.call(rid, FlushCacheReq(rid))
        return {"flushed_pages": reply.pages}


def timed_out(timeout_s: float | None) -> APIError:
    return APIError(504, f"the request did not finish within its timeout of {timeout_s:g}s and was aborted",
                    "timeout", kind="timeout_error")


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


def _wire(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as the plain map that travels in a GenerateReq (logit_bias as [id, bias] pairs:
    the wire's maps have string keys only)."""
    wire = dataclasses.asdict(params)
    if params.logit_bias is not None:
        wire["logit_bias"] = [[token, bias] for token, bias in params.logit_bias.items()]
    return wire
