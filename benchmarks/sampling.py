"""The sampler alone on one device: plain temperature sampling against filtered (top-k / top-p).

    python benchmarks/sampling.py --vocab 128256 --rows 1,8,32,64,128,256

Times `sample()` jitted by itself (20 calls in a chain, best of 5, wall clock, so small row
counts include JAX's dispatch) on random float32 logits.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.engine.sampler import SAMPLE_FILTERED, SAMPLE_PLAIN, SamplingArrays, sample


def arrays(rows: int, top_k: int, top_p: float) -> SamplingArrays:
    return SamplingArrays(
        temperature=jnp.full(rows, 0.7, jnp.float32), top_k=jnp.full(rows, top_k, jnp.int32),
        top_p=jnp.full(rows, top_p, jnp.float32), min_p=jnp.zeros(rows, jnp.float32),
        seed_lo=jnp.arange(rows, dtype=jnp.uint32), seed_hi=jnp.zeros(rows, jnp.uint32),
        token_index=jnp.zeros(rows, jnp.int32),
    )


def best_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / 20)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rows", default="1,8,32,64,128,256")
    parser.add_argument("--top-k", type=int, default=50, help="the vocabulary size turns it off")
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args()
    collectives = Collectives(Mesh(np.array(jax.devices()[:1]), ("tp",)), None)
    plain = jax.jit(lambda l, a: sample(l, a, mode=SAMPLE_PLAIN, num_logprobs=0, collectives=collectives)[0])
    filtered = jax.jit(lambda l, a: sample(l, a, mode=SAMPLE_FILTERED, num_logprobs=0, collectives=collectives)[0])
    print(f"{jax.devices()[0].device_kind}, vocab {args.vocab}, top_k {args.top_k}, top_p {args.top_p}, temperature 0.7")
    print("| rows | plain ms | filtered ms | filtered / plain |\n| --- | --- | --- | --- |")
    for rows in (int(r) for r in args.rows.split(",")):
        logits = jax.random.normal(jax.random.key(rows), (rows, args.vocab), jnp.float32) * 3
        params = arrays(rows, args.top_k, args.top_p)
        t_plain, t_filtered = best_ms(plain, logits, params), best_ms(filtered, logits, params)
        print(f"| {rows} | {t_plain:.3f} | {t_filtered:.3f} | {t_filtered / t_plain:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
