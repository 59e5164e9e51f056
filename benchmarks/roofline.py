"""The floors a benchmark reports against: copy bandwidth measured now, and the decode roofline."""

from __future__ import annotations

import time

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


def decode_roofline_bytes(
    prompt_lens: list[int], output_lens: list[int], kv_bytes_per_token: int, weights_bytes: int
) -> int:
    """Bytes every decode step must read when all requests run together: weights once, each live KV once."""
    total = 0
    for step in range(max(output_lens)):
        live_kv_tokens = sum(p + step for p, o in zip(prompt_lens, output_lens) if o > step)
        total += weights_bytes + live_kv_tokens * kv_bytes_per_token
    return total
