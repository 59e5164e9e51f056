"""The sampler's threshold-counting kernel against its pure-jnp reference (interpret mode on the CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest

from minisgl_jax.kernels.threshold_counts import threshold_counts, threshold_counts_reference


@pytest.mark.parametrize("rows,vocab,block", [(1, 4999, 256), (3, 1000, 128), (5, 128, 128)])
def test_counts_match_reference(rows, vocab, block):
    """Ragged vocabularies (a partial last block), several parts per row, cuts at -inf and above the maximum."""
    rng = np.random.default_rng(vocab)
    x = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    x[0, :7] = -np.inf  # tokens that count nowhere
    top = x.max(axis=1)
    cuts = np.sort(rng.choice(x[0, 7:], (rows, 16)), axis=1).astype(np.float32)
    cuts[:, 0], cuts[:, -1] = -np.inf, top + 1.0
    counts, masses = threshold_counts(jnp.asarray(x), jnp.asarray(top), jnp.asarray(cuts), block=block)
    want_counts, want_masses = threshold_counts_reference(jnp.asarray(x), jnp.asarray(top), jnp.asarray(cuts))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    np.testing.assert_allclose(np.asarray(masses), np.asarray(want_masses), rtol=1e-5)
    assert int(counts[0, 0]) == vocab - 7 and int(counts[0, -1]) == 0


def test_inputs_are_checked():
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="x must be float32"):
        threshold_counts(x.astype(jnp.bfloat16), jnp.zeros(2), jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match="top must be float32"):
        threshold_counts(x, jnp.zeros(3), jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match="power of two"):
        threshold_counts(x, jnp.zeros(2), jnp.zeros((2, 15)))
