"""The floors a benchmark reports against: copy bandwidth measured now, and the decode roofline."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp


def measure_copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Bytes read + written per second by a jitted elementwise op over `gib` GiB of bf16."""
    n = int(gib * 2**30) // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    bump = jax.jit(lambda a: a + jnp.bfloat16(1))
    y = bump(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        y = bump(y).block_until_ready()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n * 2 / times[len(times) // 2]


@dataclass(frozen=True)
class Experts:
    """A mixture of experts' share of the weights: a decode step must read only the experts its tokens hit."""

    bytes: int  # every expert of every sparse layer
    num_experts: int
    top_k: int

    @classmethod
    def of(cls, cfg, dtype: str, tp: int = 1) -> "Experts | None":
        """One device's share (1/tp) of a ModelConfig's experts: gate, up and down of each, weights of the
        model's `dtype` (FP8: one byte); None for a dense model."""
        if not cfg.moe_layers:
            return None
        itemsize = 1 if cfg.quantization is not None else 2 if dtype == "bfloat16" else 4
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * itemsize // tp
        return cls(per_expert * cfg.num_experts * len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok)

    def bytes_read(self, tokens: int) -> float:
        """Expected bytes for `tokens` tokens, each routed to top_k distinct experts uniformly at random:
        E * (1 - (1 - k/E)^tokens) experts a layer. Random weights route about so; a trained router's
        skew hits fewer experts, so its floor is lower."""
        hit = self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)
        return self.bytes * hit / self.num_experts


def decode_roofline_bytes(
    prompt_lens: list[int], output_lens: list[int], kv_bytes_per_token: int, weights_bytes: int,
    experts: Experts | None = None,
) -> int:
    """Bytes every decode step must read when all requests run together: the weights once (of a mixture
    of experts, the dense ones and the experts hit), each live KV once."""
    total = 0.0
    for step in range(max(output_lens)):
        live = [p + step for p, o in zip(prompt_lens, output_lens) if o > step]
        weights = weights_bytes if experts is None else weights_bytes - experts.bytes + experts.bytes_read(len(live))
        total += weights + sum(live) * kv_bytes_per_token
    return int(total)
