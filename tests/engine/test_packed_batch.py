"""The step's inputs travel as one int32 vector: unpacking inside jit gives back every array bit for bit."""

import jax
import numpy as np
import pytest

from minisgl_jax.layers.attention import AttentionMetadata
from minisgl_jax.engine.batch import StepBatch, pack_batch, unpack_batch
from minisgl_jax.engine.sampler import SamplingArrays
from minisgl_jax.engine.logits_processing import ProcessingArrays


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(0)
    ints = lambda *shape: rng.integers(-(2**31), 2**31 - 1, shape, dtype=np.int32)
    floats = lambda n: rng.standard_normal(n).astype(np.float32)
    seeds = lambda n: rng.integers(0, 2**32 - 1, n, dtype=np.uint32)
    batch = StepBatch(
        input_ids=ints(16), positions=ints(16), token_slots=ints(16),
        attn=AttentionMetadata(cu_q_lens=ints(5), kv_lens=ints(4), page_table=None, slot_mapping=ints(16)),
        seq_slots=ints(4), page_rows=ints(4, 7),
        sampling=SamplingArrays(floats(4), ints(4), floats(4), floats(4), seeds(4), seeds(4), ints(4)),
        row_steps=ints(4),
        processing=ProcessingArrays(ints(4), floats(4), floats(4), floats(4), ints(4), ints(4)),
    )
    packed, layout = pack_batch(batch)
    assert packed.dtype == np.int32 and packed.ndim == 1
    got = jax.jit(unpack_batch, static_argnums=1)(packed, layout)
    want_leaves, want_tree = jax.tree.flatten(batch)
    got_leaves, got_tree = jax.tree.flatten(got)
    assert got_tree == want_tree
    for want, have in zip(want_leaves, got_leaves):
        assert have.dtype == want.dtype and have.shape == want.shape
        np.testing.assert_array_equal(np.asarray(have), want)


def test_pack_refuses_64_bit_arrays():
    batch = StepBatch(
        input_ids=np.zeros(2, np.int64), positions=np.zeros(2, np.int32), token_slots=np.zeros(2, np.int32),
        attn=AttentionMetadata(np.zeros(2, np.int32), np.zeros(1, np.int32), None, np.zeros(2, np.int32)),
        seq_slots=np.zeros(1, np.int32), page_rows=np.zeros((1, 2), np.int32),
        sampling=SamplingArrays(*(np.zeros(1, np.float32) for _ in range(7))),
        row_steps=np.zeros(1, np.int32),
    )
    with pytest.raises(TypeError, match="32-bit"):
        pack_batch(batch)
