"""The sampler's filters (top-k, top-p, min-p) as a threshold search, against the sort that defines them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import Mesh

from minisgl_jax.layers.collectives import CollectiveBackend, Collectives
from minisgl_jax.engine.sampler import (
    SAMPLE_FILTERED, SAMPLE_PLAIN, TOP_K_PIECES_MIN_ROWS, SamplingArrays, filter_threshold, sample, top_k,
)


def kept_by_sorting(scaled: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The definition, one row: sort descending, keep rank < top_k, mass before < top_p, prob >= min_p x top."""
    order = np.argsort(-scaled, kind="stable")
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    keep = (np.arange(len(order)) < top_k) & ((np.cumsum(probs) - probs) < top_p) & (probs >= min_p * probs[0])
    keep[0] = True
    kept = np.zeros(len(order), bool)
    kept[order[keep]] = True
    return kept


def collectives_for(tp: int, mode: str = "psum") -> Collectives:
    """The reductions of a decode step on a mesh of tp CPU devices (none at tp=1)."""
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    return CollectiveBackend(mode, mesh, jnp.float32, 8, 64).for_step(True, jnp.zeros(1, jnp.int32))


@pytest.mark.parametrize("vocab", [7, 1000, 32000])
def test_threshold_keeps_what_sorting_keeps(vocab):
    rng = np.random.default_rng(vocab)
    rows = 48
    scaled = (rng.standard_normal((rows, vocab)) * rng.uniform(0.3, 8.0, (rows, 1))).astype(np.float32)
    scaled[0] = scaled[0, 0]  # one row of equal logits: all kept or none beyond the first
    top_k = rng.choice([1, 2, 5, 40, vocab], rows).astype(np.int32)
    top_p = rng.choice([1e-6, 0.3, 0.9, 0.999, 1.0], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.05, 0.5], rows).astype(np.float32)
    top_k[0], top_p[0], min_p[0] = vocab, 1.0, 0.0
    search = jax.jit(lambda *args: filter_threshold(*args, collectives=collectives_for(1)))
    threshold = np.asarray(search(scaled, scaled.max(axis=1), top_k, top_p, min_p))
    for r in range(rows):
        want = kept_by_sorting(scaled[r], top_k[r], top_p[r], min_p[r])
        got = scaled[r] >= threshold[r]
        assert np.array_equal(got, want), (r, top_k[r], top_p[r], min_p[r], got.sum(), want.sum())


def test_filtered_samples_stay_in_the_kept_set():
    rows, vocab = 64, 500
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((rows, vocab)) * 3, jnp.float32)
    arrays = SamplingArrays(
        temperature=jnp.full(rows, 0.9, jnp.float32), top_k=jnp.full(rows, 5, jnp.int32),
        top_p=jnp.full(rows, 0.8, jnp.float32), min_p=jnp.zeros(rows, jnp.float32),
        seed_lo=jnp.arange(rows, dtype=jnp.uint32), seed_hi=jnp.zeros(rows, jnp.uint32),
        token_index=jnp.zeros(rows, jnp.int32),
    )
    ids = np.asarray(sample(logits, arrays, mode=SAMPLE_FILTERED, num_logprobs=0, collectives=collectives_for(1))[0])
    scaled = np.asarray(logits) / 0.9
    for r in range(rows):
        assert kept_by_sorting(scaled[r], 5, 0.8, 0.0)[ids[r]]
    assert len(set(ids.tolist())) > 1 and (ids != np.asarray(jnp.argmax(logits, -1))).any()  # it does sample


@pytest.mark.parametrize("tp,mode", [(2, "psum"), (4, "psum"), (2, "xla")])
def test_threshold_over_vocab_shards_matches_one_device(tp, mode):
    """Each pass's counts summed over the vocab shards (the step's own exchange, or a psum where the
    step has none) give one device's threshold, bit for bit."""
    rows, vocab = 16, 1000
    rng = np.random.default_rng(tp)
    scaled = (rng.standard_normal((rows, vocab)) * 4).astype(np.float32)
    top_k = rng.choice([3, 50, vocab], rows).astype(np.int32)
    top_p = rng.choice([0.5, 0.95, 1.0], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.1], rows).astype(np.float32)
    args = (scaled, scaled.max(axis=1), top_k, top_p, min_p)
    want = jax.jit(lambda *a: filter_threshold(*a, collectives=collectives_for(1)))(*args)
    got = jax.jit(lambda *a: filter_threshold(*a, collectives=collectives_for(tp, mode)))(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert (np.asarray(got) > -np.inf).all() and len(set(np.asarray(got).tolist())) > 1


@pytest.mark.parametrize("k", [1, 16, 17, 20, 40])
def test_top_k_in_pieces_is_lax_top_k(k):
    """Pieces of at most 16 (XLA's GPU kernel; a larger k sorts) give lax.top_k's values and ids,
    ties (many, from small integers) ordered by id as it orders them."""
    rng = np.random.default_rng(k)
    half = TOP_K_PIECES_MIN_ROWS // 2  # enough rows for the pieces
    x = np.concatenate([rng.standard_normal((half, 500)), rng.integers(0, 6, (half, 500))]).astype(np.float32)
    values, ids = jax.jit(top_k, static_argnums=1)(jnp.asarray(x), k)
    want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))


def test_logprobs_are_the_log_softmax():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((4, 300)) * 4, jnp.float32)
    arrays = SamplingArrays(
        temperature=jnp.array([0.0, 0.8, 1.0, 0.0], jnp.float32), top_k=jnp.full(4, 300, jnp.int32),
        top_p=jnp.ones(4, jnp.float32), min_p=jnp.zeros(4, jnp.float32), seed_lo=jnp.arange(4, dtype=jnp.uint32),
        seed_hi=jnp.zeros(4, jnp.uint32), token_index=jnp.zeros(4, jnp.int32),
    )
    ids, chosen, top_ids, top_logprobs = sample(
        logits, arrays, mode=SAMPLE_PLAIN, num_logprobs=20, collectives=collectives_for(1)
    )
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(np.asarray(chosen), logprobs[np.arange(4), np.asarray(ids)], rtol=1e-6, atol=1e-6)
    order = np.argsort(-logprobs, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(np.asarray(top_ids), order)
    np.testing.assert_allclose(np.asarray(top_logprobs), np.take_along_axis(logprobs, order, axis=1), rtol=1e-6, atol=1e-6)
