"""Sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

A row's random stream depends only on its request's seed and the index of the token being
sampled, so the same seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from minisgl_jax.kernels.threshold_counts import threshold_counts, threshold_counts_reference
from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.utils import cdiv

SAMPLE_PLAIN = "plain"  # greedy and/or temperature rows only
SAMPLE_FILTERED = "filtered"  # some row uses top-k, top-p or min-p: needs a threshold search


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


SEARCH_BITS = 3  # each pass splits the interval 2 ** 3 = 8 ways: 7 cut points, and one at -inf to weigh the row
_LOW_BITS = 0x7FFFFFFF


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the same order (a negative float's magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ _LOW_BITS)


def _from_order_key(key: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(key >= 0, key, key ^ _LOW_BITS), jnp.float32)


def _count_above(x: jax.Array, top: jax.Array, cuts: jax.Array) -> jax.Array:
    """[rows, 2 * cuts] float32: tokens above each cut, then their mass (the GPU kernel, XLA on the CPU)."""
    count = threshold_counts if jax.default_backend() == "gpu" else threshold_counts_reference
    counts, masses = count(x, top, cuts)
    return jnp.concatenate([counts.astype(jnp.float32), masses], axis=1)


def filter_threshold(
    scaled: jax.Array, top: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
    collectives: Collectives,
) -> jax.Array:
    """Per row of scaled logits [seqs, vocab] (row maxima `top`), the smallest logit a token may have and be sampled.

    A token is kept when fewer than top_k tokens lie above it, they hold less than top_p of the
    probability, and its probability is at least min_p times the top one's; ties are kept together.
    Those sets are the tokens at or above a threshold, found without sorting the vocabulary (RESULTS.md,
    "Filtered sampling without a vocabulary sort"): 11 passes of
    `threshold_counts`, each splitting an interval of float32 values (as ordered int32 keys) 8 ways
    by the tokens and the probability above 7 cut points. Under tensor parallelism each pass sums
    its counts over the vocab shards in one small exchange.
    """
    rows, ways = scaled.shape[0], 1 << SEARCH_BITS
    j = jnp.arange(1, ways, dtype=jnp.uint32)
    low = jnp.full((rows,), _order_key(jnp.float32(-jnp.inf)))  # no room above it: every token is
    high = _order_key(top)  # room above it: no token is
    for _ in range(cdiv(32, SEARCH_BITS)):  # until the interval holds one key: every float32 told apart
        width = jax.lax.bitcast_convert_type(high - low, jnp.uint32)  # int32 wraps, uint32 holds it
        offsets = (width >> SEARCH_BITS)[:, None] * j + (((width & (ways - 1))[:, None] * j) >> SEARCH_BITS)
        cut_keys = low[:, None] + jax.lax.bitcast_convert_type(offsets, jnp.int32)
        cuts = jnp.concatenate([_from_order_key(cut_keys), jnp.full((rows, 1), -jnp.inf, jnp.float32)], axis=1)
        sums = collectives.vocab_sum(_count_above, scaled, top, cuts)
        counts, masses, total = sums[:, : ways - 1], sums[:, ways: 2 * ways - 1], sums[:, 2 * ways - 1:]
        room = (counts < top_k[:, None]) & ((top_p[:, None] >= 1.0) | (masses / total < top_p[:, None]))
        without = jnp.sum(~room, axis=1)[:, None]  # room grows with the cut: the first `without` cuts lack it
        keys = jnp.concatenate([low[:, None], cut_keys, high[:, None]], axis=1)
        low = jnp.take_along_axis(keys, without, axis=1)[:, 0]
        high = jnp.take_along_axis(keys, without + 1, axis=1)[:, 0]
    return jnp.maximum(_from_order_key(high), top + jnp.log(min_p))


def sample(
    logits: jax.Array, arrays: SamplingArrays, *, mode: str, num_logprobs: int,
    collectives: Collectives, model_logits: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """logits: [seqs, vocab] float32 -> (ids [seqs], chosen logprob [seqs], top ids/logprobs [seqs, n]).

    Logprobs are of the model's own distribution (`model_logits`, before logits processing,
    temperature and filters; `logits` when None), as vLLM reports them; they are None when
    num_logprobs is 0 and no row asked for them. `collectives`
    reduces the rows over the vocabulary (under tensor parallelism the vocab shards meet in one
    exchange per reduction, 1 per step for plain sampling, 10 for filtered).
    """
    temperature = jnp.where(arrays.temperature > 0, arrays.temperature, 1.0)
    scaled = logits / temperature[:, None]
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(_row_keys(arrays))
    if mode == SAMPLE_FILTERED:
        greedy_ids, top_logits = collectives.vocab_top(logits)
        threshold = filter_threshold(
            scaled, top_logits / temperature, arrays.top_k, arrays.top_p, arrays.min_p, collectives
        )
        (sampled,) = collectives.vocab_argmax(jnp.where(scaled >= threshold[:, None], scaled + gumbel, -jnp.inf))
    elif mode == SAMPLE_PLAIN:
        greedy_ids, sampled = collectives.vocab_argmax(logits, scaled + gumbel)
    else:
        raise ValueError(f"sample mode must be {SAMPLE_PLAIN!r} or {SAMPLE_FILTERED!r}, got {mode!r}")
    ids = jnp.where(arrays.temperature > 0, sampled.astype(jnp.int32), greedy_ids)
    if num_logprobs == 0:
        return ids, None, None, None
    logits = logits if model_logits is None else model_logits
    normalizer = jax.nn.logsumexp(logits, axis=-1)  # log-probabilities are logits - normalizer
    chosen = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0] - normalizer
    top_logits, top_ids = top_k(logits, num_logprobs)
    return ids, chosen, top_ids.astype(jnp.int32), top_logits - normalizer[:, None]


PROMPT_LOGPROBS_CHUNK = 256  # positions whose logits exist at once: [256, vocab] float32, not [tokens, vocab]


def prompt_logprobs(
    logits_of: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """At every position of a prefill: the logprob of `targets` (the next prompt token) and the top
    `k` (ids, logprobs), of the model's own distribution. hidden [tokens, hidden] -> [tokens], [tokens, k] x 2."""
    tokens = hidden.shape[0]
    chunk = math.gcd(tokens, PROMPT_LOGPROBS_CHUNK)

    def one(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        h, target = args
        logits = logits_of(h)
        normalizer = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - normalizer
        top_logits, top_ids = top_k(logits, k)
        return chosen, top_ids.astype(jnp.int32), top_logits - normalizer[:, None]

    chosen, top_ids, top_lps = jax.lax.map(
        one, (hidden.reshape(tokens // chunk, chunk, -1), targets.reshape(tokens // chunk, chunk))
    )
    return chosen.reshape(tokens), top_ids.reshape(tokens, k), top_lps.reshape(tokens, k)


# XLA's GPU top-k kernel takes k <= 16; a larger k sorts the rows, whose cost grows with the rows while
# the pieces' (16 then 4) hardly does (RESULTS.md, "Logprobs without a sort: the top 20 in pieces of 16").
TOP_K_PIECE = 16
TOP_K_PIECES_MIN_ROWS = 12


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` of rows of finite values. With TOP_K_PIECES_MIN_ROWS rows or more, in pieces of
    at most TOP_K_PIECE: each piece is the top of the row with the earlier pieces' picks set to
    -inf. Same values and ids, ties by lower id."""
    if x.shape[0] < TOP_K_PIECES_MIN_ROWS:
        return jax.lax.top_k(x, k)
    values, ids = [], []
    while k > 0:
        piece_values, piece_ids = jax.lax.top_k(x, min(k, TOP_K_PIECE))
        values.append(piece_values)
        ids.append(piece_ids)
        k -= piece_values.shape[1]
        if k > 0:
            x = x.at[jnp.arange(x.shape[0])[:, None], piece_ids].set(-jnp.inf)
    return jnp.concatenate(values, axis=1), jnp.concatenate(ids, axis=1)
