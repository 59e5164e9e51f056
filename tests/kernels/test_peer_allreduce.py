"""The peer-memory all-reduce and all-gather against psum and all_gather on 2+ GPUs of this process
(skipped elsewhere: they are inline PTX over NVLink peer memory, with no CPU form); their bfloat16
packing and input checks everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minisgl_jax.kernels.device import multiprocessor_count
from minisgl_jax.kernels.peer_allreduce import (
    PeerBuffers,
    PeerLayout,
    _pack,
    _unpack,
    peer_access_unsupported,
    peer_all_gather,
    peer_all_reduce,
    peer_all_reduce_unsupported,
)

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
needs_gpus = pytest.mark.skipif(len(GPUS) < 2, reason="needs 2 GPUs in this process")


def test_bfloat16_words_round_like_astype():
    """The kernel sums in float32 and packs pairs of bfloat16 into int32 words: round to nearest
    even, infinities and NaN kept, exactly as `astype(bfloat16)`."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    x[:6] = [np.inf, -np.inf, np.nan, 0.0, 1.00390625, 1.01171875]  # the last two: ties to even
    want = jnp.asarray(x).astype(jnp.bfloat16)
    words = _pack([jnp.asarray(x[0::2]), jnp.asarray(x[1::2])], jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(lax.bitcast_convert_type(words, jnp.bfloat16).reshape(-1), np.float32),
                                  np.asarray(want, np.float32))
    low, high = _unpack(words, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(low), np.asarray(want[0::2], np.float32))
    np.testing.assert_array_equal(np.asarray(high), np.asarray(want[1::2], np.float32))


@needs_gpus
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_equals_psum_over_many_calls(dtype):
    mesh = Mesh(np.array(GPUS[:2]), ("tp",))
    peer = PeerBuffers(mesh, "tp", 300 * 1024 * 4)
    specs = (P("tp", None), P("tp", None, None), P())

    def both(x, table, seq):  # two all-reduces per call: consecutive sequence numbers, both slots
        first = peer_all_reduce(x, table, seq, layout=peer.layout)
        second = peer_all_reduce(first * 0.5, table, seq + 1, layout=peer.layout)
        return first, second, jax.lax.psum(x, "tp"), jax.lax.psum(first * 0.5, "tp")

    step = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=specs, out_specs=(P("tp", None),) * 4, check_vma=False))
    rng = np.random.default_rng(0)
    seq = 1
    for rows, hidden in [(1, 4096), (3, 1000), (256, 1024), (300, 1024), (8, 8)] * 3:
        values = rng.standard_normal((2 * rows, hidden))
        values[0, :3] = [np.inf, -np.inf, np.nan]  # non-finite sums come out as psum's
        x = jax.device_put(jnp.asarray(values, dtype), NamedSharding(mesh, P("tp")))
        got, got2, want, want2 = step(x, peer.table, jnp.full((1,), seq, jnp.int32))
        seq += 2
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        np.testing.assert_array_equal(np.asarray(got2, np.float32), np.asarray(want2, np.float32))


@pytest.mark.skipif(not GPUS, reason="needs a GPU")
def test_grid_wider_than_the_gpu():
    """Programs number themselves by a ticket, not by program_id, so a grid of four programs per
    multiprocessor (most not resident at first) neither deadlocks nor skips or repeats a block, and
    the counter starts from 0 again on the next call, whatever its grid."""
    devices = GPUS[:2]
    mesh = Mesh(np.array(devices), ("tp",))
    wide = 4 * multiprocessor_count()
    peer = PeerBuffers(mesh, "tp", 600 * 1024 * 2, max_programs=wide)
    specs = (P("tp", None), P("tp", None, None), P())

    def both(x, table, seq):
        return peer_all_reduce(x, table, seq, layout=peer.layout), jax.lax.psum(x, "tp")

    step = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=specs, out_specs=(P("tp", None),) * 2, check_vma=False))
    rng = np.random.default_rng(2)
    for seq, (rows, hidden) in enumerate([(600, 1024), (8, 8), (600, 1024), (529, 1024)], start=1):
        x = jax.device_put(jnp.asarray(rng.standard_normal((len(devices) * rows, hidden)), jnp.bfloat16),
                           NamedSharding(mesh, P("tp")))
        got, want = step(x, peer.table, jnp.full((1,), seq, jnp.int32))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@needs_gpus
def test_unsupported_inputs_are_named():
    mesh = Mesh(np.array(GPUS[:2]), ("tp",))
    layout = PeerBuffers(mesh, "tp", 4096).layout
    assert "float16" in peer_all_reduce_unsupported((8, 8), jnp.float16, layout)
    assert "multiple of 8" in peer_all_reduce_unsupported((3, 3), jnp.bfloat16, layout)
    assert "exceed" in peer_all_reduce_unsupported((64, 1024), jnp.bfloat16, layout)


@needs_gpus
def test_driver_reports_peer_access():
    assert peer_access_unsupported(GPUS[:2]) is None


@needs_gpus
def test_gather_equals_all_gather_between_sums():
    """Gathers share the all-reduces' sequence: a sum, a gather and a sum in one program, any size
    (word counts not a multiple of 4 are padded), every device's bits exactly."""
    mesh = Mesh(np.array(GPUS[:2]), ("tp",))
    peer = PeerBuffers(mesh, "tp", 64 * 1024 * 4)
    specs = (P("tp", None), P("tp", None), P("tp", None, None), P())

    def mixed(x, ids, table, seq):
        total = peer_all_reduce(x, table, seq, layout=peer.layout)
        values = peer_all_gather(x.astype(jnp.float32), table, seq + 1, layout=peer.layout)
        indices = peer_all_gather(ids, table, seq + 2, layout=peer.layout)
        again = peer_all_reduce(total, table, seq + 3, layout=peer.layout)
        want = (jax.lax.all_gather(x.astype(jnp.float32), "tp"), jax.lax.all_gather(ids, "tp"),
                jax.lax.psum(total, "tp"))
        return (values, indices, again) + want

    step = jax.jit(jax.shard_map(mixed, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
    rng = np.random.default_rng(1)
    seq = 1
    for rows, width in [(1, 8), (3, 8), (5, 16), (256, 4)] * 2:
        values = rng.standard_normal((2 * rows, width)).astype(np.float32)
        values[0, :2] = [np.nan, -0.0]
        x = jax.device_put(jnp.asarray(values), NamedSharding(mesh, P("tp")))
        ids = jax.device_put(jnp.asarray(rng.integers(-2**31, 2**31 - 1, (2 * rows, width // 8 + 1)), jnp.int32),
                             NamedSharding(mesh, P("tp")))
        got = step(x, ids, peer.table, jnp.full((1,), seq, jnp.int32))
        seq += 4
        for a, b in zip(got[:2], got[3:5]):
            np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))
        np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(got[5]))  # NaN's payload may differ


def test_gather_inputs_are_checked():
    layout = PeerLayout(num_devices=2, capacity_words=64, max_programs=4)
    table, seq = jnp.zeros((1, 2, 5), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="int32 or float32, got bfloat16"):
        peer_all_gather(jnp.zeros(8, jnp.bfloat16), table, seq, layout=layout)
    with pytest.raises(ValueError, match="needs 68 words, buffers hold 64"):
        peer_all_gather(jnp.zeros(65, jnp.int32), table, seq, layout=layout)
