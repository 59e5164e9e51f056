"""The cost tensor parallelism adds to a step: one all-reduce of [rows, hidden] over the tp GPUs.

Times 64 chained `psum`s under `shard_map` in one jitted program (a decode step of a 32-layer
model has 65: two per layer and one for the vocab-parallel embedding).

    NCCL_NVLS_ENABLE=0 python3 benchmarks/allreduce.py --tp 2
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

try:
    from jax import shard_map
except ImportError:  # jax < 0.8 keeps it under experimental
    from jax.experimental.shard_map import shard_map

CHAIN = 64


def chained_psums(x: jax.Array) -> jax.Array:
    for _ in range(CHAIN):
        x = jax.lax.psum(x, "tp") * 0.5  # halved so the values stay finite
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rows", default="1,8,64,256")
    parser.add_argument("--hidden", default="4096,5120")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.tp > jax.device_count():
        raise SystemExit(f"--tp {args.tp} needs {args.tp} devices; this host has {jax.device_count()}")
    mesh = Mesh(np.array(jax.devices()[: args.tp]), ("tp",))
    step = jax.jit(shard_map(chained_psums, mesh=mesh, in_specs=P("tp", None), out_specs=P("tp", None)))
    print(f"| rows x hidden (bf16) | per all-reduce, tp={args.tp} |\n| --- | --- |")
    for rows in map(int, args.rows.split(",")):
        for hidden in map(int, args.hidden.split(",")):
            x = jax.device_put(jnp.ones((args.tp * rows, hidden), jnp.bfloat16), NamedSharding(mesh, P("tp", None)))
            step(x).block_until_ready()
            start = time.perf_counter()
            for _ in range(args.iters):
                y = step(x)
            y.block_until_ready()
            seconds = (time.perf_counter() - start) / args.iters / CHAIN
            print(f"| {rows} x {hidden} | {seconds * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
