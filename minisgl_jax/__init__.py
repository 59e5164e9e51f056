"""minisgl-jax: a compact, fast LLM inference and serving engine in JAX."""

from .core import FinishReason, RequestOutput, SamplingParams
from .config import EngineArgs

__all__ = ["EngineArgs", "FinishReason", "LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    """`LLM` imports the engine (and JAX) only when asked for."""
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)
