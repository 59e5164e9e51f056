"""Whether a request would be served now: /health (and /health/ready), /health/live, and the gate of
every route that needs the engine."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.protocol import APIError

# The scheduler's heartbeat thread beats every 0.5 s: this long a silence means the process is
# stopped or hung hard (a pass that runs long still beats; --watchdog-timeout judges those).
HEARTBEAT_TIMEOUT_S = 10.0


class Readiness:
    """Ready: the launcher has no problem, the model is loaded and compiled, and the scheduler beats
    and makes progress (vLLM's and SGLang's meaning of /health)."""

    def __init__(self, client: EngineClient, watchdog_timeout_s: float,
                 launcher_problem: Callable[[], str | None]) -> None:
        self.client = client
        self.watchdog_timeout_s = watchdog_timeout_s
        self.launcher_problem = launcher_problem

    def reason(self) -> str | None:
        """Why a request would not be served now, or None."""
        problem = self.launcher_problem()
        if problem is not None:
            return problem
        if self.client.ready is None:
            return "the model is still loading and compiling"
        silent = time.monotonic() - self.client.stats_at
        if silent > HEARTBEAT_TIMEOUT_S:
            return f"the scheduler process has sent no heartbeat for {silent:.0f}s: it is stopped or hung"
        stats = self.client.stats
        if stats is not None and stats.busy_s > self.watchdog_timeout_s:
            doing = "has waited for a step program to compile" if stats.compiling else "has made no progress"
            return (f"the scheduler {doing} for {stats.busy_s:.0f}s, longer than --watchdog-timeout "
                    f"{self.watchdog_timeout_s:g}s")
        return None

    def require(self) -> None:
        """A 503 with the reason, unless ready."""
        reason = self.reason()
        if reason is not None:
            raise APIError(503, f"the server is not ready: {reason}", kind="service_unavailable")

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/health/ready", self.health, methods=["GET"])
        app.add_api_route("/health/live", self.liveness, methods=["GET"])

    async def health(self) -> JSONResponse:
        """200 only when a request would be served now; else 503 with the reason."""
        reason = self.reason()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def liveness(self) -> JSONResponse:
        """Liveness: the API process answers (the launcher ends the server if a worker dies)."""
        return JSONResponse({"status": "alive"})
