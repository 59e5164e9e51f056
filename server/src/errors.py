"""Every error the API answers has an OpenAI-shaped body; request validation is a 400 (never 422)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from minisgl_jax.server.metrics import ServerMetrics
from minisgl_jax.server.protocol import APIError
from starlette.exceptions import HTTPException


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Our APIError, pydantic's validation errors, Starlette's HTTP errors and any bug, each counted."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        metrics.errors.labels(str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        # The deepest error: a union field's value fails every member, and the member it was meant for goes furthest.
        error = max(err.errors(), key=lambda e: len(e["loc"]))
        param = body_path(error, err.body)
        message = f"{param}: {error['msg']}" if param else f"the request body must be a JSON object: {error['msg']}"
        metrics.errors.labels("400").inc()
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        metrics.errors.labels(str(err.status_code)).inc()
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        """A bug, not bad input: an OpenAI-shaped 500 for the client; Starlette logs the traceback."""
        metrics.errors.labels("500").inc()
        return JSONResponse(APIError(500, f"internal server error ({type(err).__name__})").body(), status_code=500)


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
