"""minisgl-jax: a compact, fast LLM inference and serving engine in JAX."""

from .core import FinishReason, RequestOutput, SamplingParams

__all__ = ["FinishReason", "RequestOutput", "SamplingParams"]
