"""Where the tensor-parallel partial sums meet: placed by XLA, or summed by us under `shard_map`.

Row-parallel layers (o_proj, down) and the vocab-parallel embedding leave each device a partial
sum. Three ways to add them over the `tp` axis (`--all-reduce`):
  xla   GSPMD places the all-reduce. Under jax 0.11 on GPUs each one is a collective thunk that
        ends the step's CUDA graph: a Llama-8B tp=2 step is 67 graphs per GPU (benchmarks/RESULTS.md).
  psum  the same sums as an explicit `psum` per shard: XLA's collective, our placement.
  peer  kernels/src/peer_allreduce.py: a Pallas Triton kernel over NVLink peer memory, captured in
        XLA's CUDA graph like any kernel. Decode steps only (their rows fit the receive buffers);
        prefill steps keep XLA's all-reduce. One process must drive all the mesh's GPUs.
The sampler's argmax over the vocab-parallel logits meets the same way: XLA gathers each argmax's
local maxima in NCCL all-gathers of its own (four per step, each ending the CUDA graph), while
under `psum` and `peer` one exchange per step carries them all (`Collectives.vocab_argmax`).
Filtered sampling's threshold search sums small per-shard counts (`Collectives.vocab_sum`): through
the step's all-reduce where it has one of its own, else an explicit `psum`.
Each step numbers its collectives at trace time (`Collectives`); the peer kernel's sequence number
continues across steps in the device state, so consecutive calls alternate buffer slots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from minisgl_jax.config import ALL_REDUCE_MODES
from minisgl_jax.kernels.peer_allreduce import (
    PeerBuffers,
    peer_access_unsupported,
    peer_all_gather,
    peer_all_reduce,
    peer_all_reduce_unsupported,
)

logger = logging.getLogger(__name__)


def peer_unsupported(mesh: Mesh) -> str | None:
    """Why the peer kernel cannot run on this mesh (None when it can)."""
    devices = list(mesh.devices.flat)
    if jax.process_count() > 1 or any(d.platform != "gpu" for d in devices):
        return (f"it needs the mesh's GPUs all in this one process (found {devices[0].platform} devices "
                f"over {jax.process_count()} processes)")
    return peer_access_unsupported(devices)


def resolve_all_reduce(mode: str, mesh: Mesh) -> str:
    """The mode to run: `auto` is `peer` where it can run (GPUs of one process with peer access), else `xla`."""
    if mode not in ALL_REDUCE_MODES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_MODES}, got {mode!r}")
    if mesh.size == 1:
        return "xla"  # nothing to add up
    if mode == "auto":
        return "peer" if peer_unsupported(mesh) is None else "xla"
    if mode == "peer" and (reason := peer_unsupported(mesh)):
        raise ValueError(f"all_reduce 'peer' cannot run here: {reason}; use 'xla'")
    return mode


class Collectives:
    """The collectives of one traced step, numbered in call order.

    `impl` None leaves the sums to XLA (plain einsum and gather on sharded arrays), `gather` None the
    sampler's argmax; otherwise they run per shard: `impl(partial, index, *extra)` adds partial sums
    over `tp`, and `gather(x, index, *extra)` stacks every device's x in device order ([devices, *x.shape]).
    """

    def __init__(
        self, mesh: Mesh, impl: Callable[..., jax.Array] | None, gather: Callable[..., jax.Array] | None = None,
        extra_args: tuple = (), extra_specs: tuple = (),
    ) -> None:
        self.mesh, self.impl, self.gather = mesh, impl, gather
        self.extra_args, self.extra_specs = extra_args, extra_specs
        self.count = 0

    def _sum_per_shard(self, local, args: tuple, specs: tuple) -> jax.Array:
        index = self.count
        self.count += 1

        def per_shard(*xs):
            return self.impl(local(*xs[: len(args)]), index, *xs[len(args):])

        in_specs = tuple(specs) + tuple(self.extra_specs)
        fn = jax.shard_map(per_shard, mesh=self.mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
        return fn(*args, *self.extra_args)

    def matmul(self, equation: str, x: jax.Array, w: jax.Array, x_spec: P, w_spec: P) -> jax.Array:
        """A row-parallel product: x and w sharded along the contracted axis, the result replicated."""
        if self.impl is None:
            return jnp.einsum(equation, x, w)
        return self._sum_per_shard(lambda x, w: jnp.einsum(equation, x, w), (x, w), (x_spec, w_spec))

    def sum_local(self, local: Callable[..., jax.Array], args: tuple, specs: tuple) -> jax.Array:
        """local(*each device's shards of args, as `specs` lay them out) summed over `tp`, replicated:
        for layers whose per-shard product is no einsum (the experts' grouped GEMMs, models/moe.py).
        Under `xla` (and in prefill steps) an explicit `psum`."""
        if self.mesh.size == 1:
            return local(*args)
        if self.impl is None:
            fn = jax.shard_map(lambda *xs: jax.lax.psum(local(*xs), "tp"), mesh=self.mesh, in_specs=specs,
                               out_specs=P(), check_vma=False)
            return fn(*args)
        return self._sum_per_shard(local, args, specs)

    def embed(self, ids: jax.Array, table: jax.Array) -> jax.Array:
        """Rows of a vocab-parallel embedding table [vocab, hidden] (sharded over vocab) for `ids`."""
        if self.impl is None:
            return table[ids]

        def lookup(ids, local_table):
            rows = local_table.shape[0]
            local_ids = ids - jax.lax.axis_index("tp") * rows
            mine = (local_ids >= 0) & (local_ids < rows)
            found = local_table[jnp.where(mine, local_ids, 0)]
            return jnp.where(mine[:, None], found, jnp.zeros((), found.dtype))

        return self._sum_per_shard(lookup, (ids, table), (P(), P("tp", None)))

    def vocab_argmax(self, *xs: jax.Array) -> tuple[jax.Array, ...]:
        """Row argmaxes ([rows] int32) of [rows, vocab] arrays sharded over vocab, in one exchange:
        each device sends its local maximum and index per row and array. Ties go to the lowest
        index, as `jnp.argmax`'s."""
        return tuple(ids for ids, _ in self._vocab_max(xs))

    def vocab_top(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(row argmax [rows] int32, row maximum [rows] float32) of x [rows, vocab], in one exchange."""
        return self._vocab_max((x,))[0]

    def _vocab_max(self, xs: tuple[jax.Array, ...]) -> list[tuple[jax.Array, jax.Array]]:
        if self.gather is None:
            return [(jnp.argmax(x, axis=-1).astype(jnp.int32), jnp.max(x, axis=-1).astype(jnp.float32)) for x in xs]
        index = self.count
        self.count += 1

        def per_shard(*args):
            local, extra = args[: len(xs)], args[len(xs):]
            offset = jax.lax.axis_index("tp") * local[0].shape[-1]
            words = []
            for x in local:
                best = jnp.argmax(x, axis=-1)
                value = jnp.take_along_axis(x, best[:, None], axis=-1)[:, 0].astype(jnp.float32)
                words += [jax.lax.bitcast_convert_type(value, jnp.int32), best.astype(jnp.int32) + offset]
            every = self.gather(jnp.stack(words, axis=-1), index, *extra)  # [devices, rows, 2 per array]
            found = []
            for i in range(len(xs)):
                values = jax.lax.bitcast_convert_type(every[..., 2 * i], jnp.float32)
                device = jnp.argmax(values, axis=0)[None]
                found += [jnp.take_along_axis(every[..., 2 * i + 1], device, axis=0)[0],
                          jnp.take_along_axis(values, device, axis=0)[0]]
            return tuple(found)

        in_specs = (P(None, "tp"),) * len(xs) + tuple(self.extra_specs)
        fn = jax.shard_map(per_shard, mesh=self.mesh, in_specs=in_specs, out_specs=(P(),) * (2 * len(xs)),
                           check_vma=False)
        found = fn(*xs, *self.extra_args)
        return [(found[2 * i], found[2 * i + 1]) for i in range(len(xs))]

    def vocab_sum(self, local: Callable[..., jax.Array], x: jax.Array, *replicated: jax.Array) -> jax.Array:
        """local(x's vocab shard, *replicated) summed over the devices: x [rows, vocab] is sharded
        over vocab, the result replicated. Under `xla` (and in prefill steps) an explicit `psum`."""
        if self.mesh.size == 1:
            return local(x, *replicated)
        specs = (P(None, "tp"),) + (P(),) * len(replicated)
        if self.impl is None:
            fn = jax.shard_map(lambda *args: jax.lax.psum(local(*args), "tp"), mesh=self.mesh, in_specs=specs,
                               out_specs=P(), check_vma=False)
            return fn(x, *replicated)
        return self._sum_per_shard(local, (x, *replicated), specs)


class CollectiveBackend:
    """The engine's choice of all-reduce, and the peer kernel's buffers when it uses them."""

    def __init__(self, mode: str, mesh: Mesh, dtype: jnp.dtype, max_decode_rows: int, hidden_size: int) -> None:
        self.mesh = mesh
        self.mode = resolve_all_reduce(mode, mesh)
        self.peer: PeerBuffers | None = None
        if self.mode == "peer":
            # One row must fit the kernel's word layout, so that every decode bucket does.
            if reason := peer_all_reduce_unsupported((1, hidden_size), dtype):
                if mode != "auto":
                    raise ValueError(f"all_reduce 'peer' cannot sum rows of {hidden_size}: {reason}")
                self.mode = "xla"
            else:
                self.peer = PeerBuffers(mesh, "tp", max_decode_rows * hidden_size * jnp.dtype(dtype).itemsize)
        if mesh.size > 1:
            logger.info("tensor-parallel sums: %s (asked: %s)", self.mode, mode)

    def for_step(self, is_decode: bool, seq: jax.Array) -> Collectives:
        """The collectives of one step; seq ([1] int32, the device state's) numbers the peer kernel's calls."""
        if self.mode == "psum":
            return Collectives(self.mesh, lambda partial, index: jax.lax.psum(partial, "tp"),
                            lambda x, index: jax.lax.all_gather(x, "tp"))
        if self.mode == "peer" and is_decode:
            layout = self.peer.layout

            def peer_sum(partial, index, table, seq):
                return peer_all_reduce(partial, table, seq + index, layout=layout)

            def peer_gather(x, index, table, seq):
                return peer_all_gather(x, table, seq + index, layout=layout)

            return Collectives(self.mesh, peer_sum, peer_gather, (self.peer.table, seq), (P("tp", None, None), P()))
        return Collectives(self.mesh, None)
