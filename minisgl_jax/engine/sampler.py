"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

A row's random stream depends only on its request's seed and the index of the token being
sampled, so the same seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

SAMPLE_PLAIN = "plain"  # greedy and/or temperature rows only
SAMPLE_FILTERED = "filtered"  # some row uses top-k, top-p or min-p: needs a sort of the vocabulary


@jax.tree_util.register_dataclass
@dataclass
class SamplingArrays:
    """Per-sequence sampling parameters, each [seqs]; temperature 0 means greedy."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, vocab size when off
    top_p: jax.Array  # float32, 1.0 when off
    min_p: jax.Array  # float32, 0.0 when off
    seed_lo: jax.Array  # uint32
    seed_hi: jax.Array  # uint32
    token_index: jax.Array  # int32: index of the token being sampled within the request's output


def _row_keys(arrays: SamplingArrays) -> jax.Array:
    def key_of(lo, hi, index):
        key = jax.random.fold_in(jax.random.key(0), lo)
        return jax.random.fold_in(jax.random.fold_in(key, hi), index)

    return jax.vmap(key_of)(arrays.seed_lo, arrays.seed_hi, arrays.token_index)


def sample(
    logits: jax.Array, arrays: SamplingArrays, *, mode: str, num_logprobs: int,
    row_argmax: Callable[..., tuple[jax.Array, ...]],
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """logits: [seqs, vocab] float32 -> (ids [seqs], chosen logprob [seqs], top ids/logprobs [seqs, n]).

    Logprobs are of the model's own distribution (before temperature and filters), as vLLM
    reports them; they are None when num_logprobs is 0 and no row asked for them. `row_argmax`
    takes [seqs, vocab] arrays to their row argmaxes all at once (`StepSums.vocab_argmax`: under
    tensor parallelism the vocab shards' maxima meet in one collective).
    """
    temperature = jnp.where(arrays.temperature > 0, arrays.temperature, 1.0)
    scaled = logits / temperature[:, None]
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(_row_keys(arrays))
    if mode == SAMPLE_FILTERED:
        (greedy_ids,) = row_argmax(logits)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        rank = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
        keep = rank < arrays.top_k[:, None]
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < arrays.top_p[:, None]
        keep &= probs >= arrays.min_p[:, None] * probs[:, :1]
        keep = keep.at[:, 0].set(True)
        choice = jnp.argmax(jnp.where(keep, sorted_logits, -jnp.inf) + gumbel, axis=-1)
        sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    elif mode == SAMPLE_PLAIN:
        greedy_ids, sampled = row_argmax(logits, scaled + gumbel)
    else:
        raise ValueError(f"sample mode must be {SAMPLE_PLAIN!r} or {SAMPLE_FILTERED!r}, got {mode!r}")
    ids = jnp.where(arrays.temperature > 0, sampled.astype(jnp.int32), greedy_ids)
    if num_logprobs == 0:
        return ids, None, None, None
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return ids, chosen, top_ids.astype(jnp.int32), top_logprobs
