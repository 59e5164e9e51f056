"""ASGI middleware for the API: the API key and the request body limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so `receive` reaches the endpoints as
uvicorn gives it: the endpoints listen on it for the client's disconnect.
"""

from __future__ import annotations

import hmac
import json

from minisgl_jax.server.protocol import APIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = ("/health", "/health/ready", "/health/live", "/metrics")


async def send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class APIKeyCheck:
    """`Authorization: Bearer KEY` on every path but health and metrics, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send_error(send, APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                                kind="authentication_error"))
                return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over max_bytes, by its Content-Length or, when chunked, as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = APIError(413, f"the request body is over the limit of {self.max_bytes} bytes", kind="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, error)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, error)
