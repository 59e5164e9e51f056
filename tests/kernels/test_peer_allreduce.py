"""The peer-memory all-reduce against psum on 2+ GPUs of this process (skipped elsewhere: it is
inline PTX over NVLink peer memory, with no CPU form); its bfloat16 packing everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minisgl_jax.kernels.peer_allreduce import (
    PeerBuffers,
    _pack,
    _unpack,
    peer_access_unsupported,
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
