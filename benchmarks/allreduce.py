"""The cost tensor parallelism adds to a step: one all-reduce of [rows, hidden] over the tp GPUs.

Times 64 chained all-reduces under `shard_map` in one jitted program (a decode step of a
32-layer model has 65: two per layer and one for the vocab-parallel embedding), for each
implementation: `xla` (`psum`, XLA's collective thunk), `peer` (kernels/src/peer_allreduce.py, what
the engine's decode steps use on the GPUs of one process) and `oneshot`, a candidate kept here
because it lost: a Mosaic GPU kernel that reads every peer's shard straight from its memory over
NVLink and sums in float32. Before timing, each candidate's result on random shards is compared
with `psum`'s (three calls each). `--matmul` puts a [rows, 4096] x [4096, 4096]
matmul before each all-reduce, so the GPU has work to hide the host's launches behind.

The candidate, step by step:
  1. Before the launch, XLA holds a barrier across the devices (Mosaic GPU's default for a
     kernel that touches peer memory), so every peer's input has been written.
  2. Program b sums tiles b, b + programs, ... of its own input and of each peer's input (the
     peers' addresses come from XLA's collective metadata), and stores them locally.
  3. Program b signals program b on every peer, then waits for their signals: no device leaves
     the kernel (and lets XLA reuse its input buffer) while a peer may still read it.
It was slower than `psum` on an H200 pair (2026-11-30): each Mosaic GPU launch costs more host
time than the bytes take (benchmarks/RESULTS.md, "A one-shot all-reduce of our own").

    NCCL_NVLS_ENABLE=0 python3 benchmarks/allreduce.py --tp 2 --impls none,xla,peer --matmul
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minisgl_jax.kernels.device import multiprocessor_count
from minisgl_jax.kernels.peer_allreduce import PeerBuffers, PeerLayout, peer_all_reduce

CHAIN = 64
LANE_ELEMENTS = 1024  # one row of the kernel's [rows, 1024] view of the input
TILE_BYTES = 8192  # per source and program step: 64 bytes per thread of a warpgroup
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def all_reduce_unsupported(shape: tuple[int, ...], dtype: jnp.dtype) -> str | None:
    """Why this kernel cannot all-reduce an array of `shape` and `dtype` (None when it can)."""
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} is not one of bfloat16, float16, float32"
    size = 1
    for dim in shape:
        size *= dim
    if size == 0 or size % LANE_ELEMENTS:
        return f"{size} elements is not a positive multiple of {LANE_ELEMENTS}"
    return None


def _tile_rows(num_rows: int, itemsize: int) -> int:
    """The largest power-of-two row count per tile, up to TILE_BYTES, that divides the rows."""
    rows = max(1, TILE_BYTES // (LANE_ELEMENTS * itemsize))
    while num_rows % rows:
        rows //= 2
    return rows


def one_shot_all_reduce(x: jax.Array, axis_name: str, num_devices: int) -> jax.Array:
    """Sum `x` over the `axis_name` devices; call per shard under `shard_map`.

    `num_devices` is the size of `axis_name` (static: the kernel unrolls its peers).
    """
    if num_devices == 1:
        return x
    if (reason := all_reduce_unsupported(x.shape, x.dtype)) is not None:
        raise ValueError(f"one_shot_all_reduce: {reason}")
    num_rows = x.size // LANE_ELEMENTS
    tile = _tile_rows(num_rows, x.dtype.itemsize)
    num_tiles = num_rows // tile
    programs = min(num_tiles, multiprocessor_count())  # more programs would only queue
    kernel = _build_kernel(num_rows, jnp.dtype(x.dtype), tile, programs, axis_name, num_devices)
    return kernel(x.reshape(num_rows, LANE_ELEMENTS)).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _build_kernel(num_rows: int, dtype: jnp.dtype, tile: int, programs: int, axis_name: str, num_devices: int):
    num_tiles = num_rows // tile

    def body(x_ref, y_ref, done):
        device = jax.lax.axis_index(axis_name)
        program = jax.lax.axis_index("programs")
        peers = [jax.lax.rem(device + i, num_devices) for i in range(1, num_devices)]
        peer_refs = [plgpu.remote_ref(x_ref, peer) for peer in peers]

        @pl.loop(program, num_tiles, step=programs)
        def _sum_tile(t):
            rows = pl.ds(t * tile, tile)
            parts = [x_ref[rows]] + [ref[rows] for ref in peer_refs]
            total = parts[0].astype(jnp.float32)
            for part in parts[1:]:
                total = total + part.astype(jnp.float32)
            y_ref[rows] = total.astype(dtype)

        for peer in peers:
            pl.semaphore_signal(done, device_id=peer)
        pl.semaphore_wait(done, num_devices - 1)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_rows, LANE_ELEMENTS), dtype),
        scratch_types=[plgpu.SemaphoreType.REGULAR],
        grid=(programs,),
        grid_names=("programs",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        kernel_name="one_shot_all_reduce",
    )


AllReduce = Callable[[jax.Array, int, jax.Array, jax.Array], jax.Array]  # (x, index in the program, table, seq)


def all_reduce_fn(impl: str, tp: int, layout: PeerLayout) -> AllReduce:
    if impl == "none":  # the chain's other work alone (with --matmul: the matmuls)
        return lambda x, k, table, base: x
    if impl == "xla":
        return lambda x, k, table, base: jax.lax.psum(x, "tp")
    if impl == "oneshot":
        return lambda x, k, table, base: one_shot_all_reduce(x, "tp", tp)
    if impl == "peer":
        return lambda x, k, table, base: peer_all_reduce(x, table, base + k, layout=layout)
    raise SystemExit(f"--impls: unknown implementation {impl!r} (none, xla, oneshot, peer)")


def chained(all_reduce: AllReduce, matmul: bool) -> Callable[..., jax.Array]:
    def run(x: jax.Array, w: jax.Array, table: jax.Array, base: jax.Array) -> jax.Array:
        for k in range(CHAIN):
            if matmul:
                x = x @ w
            x = (all_reduce(x, k, table, base) * 0.5).astype(x.dtype)  # halved so the values stay finite
        return x

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--impls", default="xla,peer", help="none, xla, oneshot, peer")
    parser.add_argument("--rows", default="1,8,64,256")
    parser.add_argument("--hidden", default="4096,5120")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--matmul", action="store_true", help="a [rows, hidden] x [hidden, hidden] matmul before each")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.tp > jax.device_count():
        raise SystemExit(f"--tp {args.tp} needs {args.tp} devices; this host has {jax.device_count()}")
    mesh = Mesh(np.array(jax.devices()[: args.tp]), ("tp",))
    sharded, dtype = NamedSharding(mesh, P("tp", None)), jnp.dtype(args.dtype)
    impls = args.impls.split(",")

    max_rows, max_hidden = max(map(int, args.rows.split(","))), max(map(int, args.hidden.split(",")))
    peer = PeerBuffers(mesh, "tp", max_rows * max_hidden * dtype.itemsize)
    next_seq = [1]  # the peer kernel's sequence: one more per all-reduce, across calls, as in the engine

    def per_shard(fn: Callable[..., jax.Array], arity: int, all_reduces: int) -> Callable[..., jax.Array]:
        specs = (P("tp", None),) * arity + (P("tp", None, None), P())
        step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("tp", None), check_vma=False))

        def call(*xs: jax.Array) -> jax.Array:
            base = next_seq[0]
            next_seq[0] += all_reduces
            return step(*xs, peer.table, jnp.full((1,), base, jnp.int32))

        return call

    def single(impl: str) -> Callable[..., jax.Array]:
        return per_shard(lambda x, table, base: all_reduce_fn(impl, args.tp, peer.layout)(x, 0, table, base), 1, 1)

    psum = single("xla")
    once = {impl: single(impl) for impl in impls if impl in ("oneshot", "peer")}
    steps = {impl: per_shard(chained(all_reduce_fn(impl, args.tp, peer.layout), args.matmul), 2, CHAIN)
             for impl in impls}
    work = " after a matmul" if args.matmul else ""
    print(f"| rows x hidden ({dtype.name}) | " + " | ".join(f"{impl}, tp={args.tp}{work}" for impl in impls)
          + " | max abs diff to psum |")
    print("| --- " * (len(impls) + 2) + "|")
    for rows in map(int, args.rows.split(",")):
        for hidden in map(int, args.hidden.split(",")):
            shards = np.random.default_rng(rows * hidden).standard_normal((args.tp * rows, hidden))
            x = jax.device_put(jnp.asarray(shards, dtype), sharded)
            w = jax.device_put(jnp.full((args.tp * hidden, hidden), 1 / hidden, dtype), sharded)
            want = np.asarray(psum(x), np.float32)
            diffs = [float(np.abs(np.asarray(fn(x), np.float32) - want).max())
                     for fn in once.values() for _ in range(3)]
            cells = []
            for impl in impls:
                steps[impl](x, w).block_until_ready()
                start = time.perf_counter()
                for _ in range(args.iters):
                    y = steps[impl](x, w)
                y.block_until_ready()
                cells.append(f"{(time.perf_counter() - start) / args.iters / CHAIN * 1e6:.1f} us")
            print(f"| {rows} x {hidden} | " + " | ".join(cells) + f" | {max(diffs, default=0.0):.3g} |", flush=True)


if __name__ == "__main__":
    main()
