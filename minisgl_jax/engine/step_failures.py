"""What a failed step does to the engine: its own requests end with an error and the engine goes on,
unless the failure came from the device or every step keeps failing.

Across hosts every node builds and reads the same batches, so a step error that the batch itself
causes ends the same requests on every node, which stay in lockstep.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax

from minisgl_jax.core import FinishReason, RequestOutput
from minisgl_jax.engine.outputs import request_output
from minisgl_jax.engine.request import Req

logger = logging.getLogger(__name__)

# Failed steps in a row that end the engine: a fault that every step meets, not one batch's.
MAX_FAILED_STEPS = 3


class EngineBroken(RuntimeError):
    """The engine cannot serve any more: a device error, or MAX_FAILED_STEPS failed steps in a row."""


def is_device_error(error: BaseException) -> bool:
    """Whether a step's failure came from the device runtime, which ends the engine.

    jax raises a launched program's runtime failures (CUDA errors, device out of memory, NCCL
    failures) as JaxRuntimeError (jaxlib's XlaRuntimeError), at launch or when its results are
    read; the donated KV pool and device state are then in an unknown state. Every other failure
    is a step error, which only that step's requests pay for: the step's batch failed to build
    on the host, its program failed to compile (CompileError, raised before anything runs), or the
    host's bookkeeping of its results raised.
    """
    return isinstance(error, jax.errors.JaxRuntimeError)


class FailedSteps:
    """Failed steps in a row, reset by every step whose tokens are read."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def succeeded(self) -> None:
        self.in_a_row = 0

    def record(self, error: Exception, kind: str, num_requests: int) -> None:
        """Count a failed `kind` ("decode" or "prefill") step; raise EngineBroken when the engine
        cannot go on, else log it (its requests then end with an error)."""
        if is_device_error(error):
            raise EngineBroken(f"a device error in a {kind} step: {error}") from error
        self.in_a_row += 1
        if self.in_a_row >= MAX_FAILED_STEPS:
            raise EngineBroken(
                f"{self.in_a_row} steps failed in a row; the last, a {kind} step: {type(error).__name__}: {error}"
            ) from error
        logger.error(
            "a %s step failed (%s: %s): its requests (%d) end with an error, the others go on "
            "(%d of %d failed steps in a row end the engine)",
            kind, type(error).__name__, error, num_requests, self.in_a_row, MAX_FAILED_STEPS, exc_info=error,
        )


def end_with_error(reqs: list[Req], error: Exception, finish: Callable[[Req, FinishReason], None]) -> list[RequestOutput]:
    """End a failed step's requests (`finish` gives their pages back); each output names the error."""
    outputs = []
    for req in reqs:
        if not req.finished:
            finish(req, FinishReason.ERROR)
        outputs.append(dataclasses.replace(request_output(req), error=f"{type(error).__name__}: {error}"))
    return outputs
