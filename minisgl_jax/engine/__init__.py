"""The engine: jitted steps, sampling, scheduling."""

from .engine import Engine

__all__ = ["Engine"]
