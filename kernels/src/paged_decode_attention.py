"""Decode attention over the paged KV cache: one query token per sequence, flash-decoding split-K.

One program per (sequence, kv head, split) reads its share of the sequence's keys once, block_k
tokens per loop step, for all q heads of its group at once (GQA: the group's rows are padded to
the 16 rows a tensor-core dot needs; they cost no extra memory traffic). Decode is bound by
reading the KV cache, so the layout of work is about keeping loads in flight: block_k tokens of
K and V per step, Triton's software pipelining over steps, and, when sequences x kv heads are too
few to fill the GPU, splitting each sequence's keys over `num_splits` programs whose partial
results a small second pass combines.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .device import multiprocessor_count
from .paged_blocks import (
    LOG2E,
    attend_block,
    compiler_params,
    fit_tile,
    init_carry,
    load_kv,
    load_rows,
    normalise,
    resolve_interpret,
    store_rows,
    token_slots,
)

# Splits pay only while programs are few: aim at 2 programs per multiprocessor (RESULTS.md, "Decode
# attention: splits and block size").
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 512  # a split shorter than this costs more in the combine than it gains
# With this many programs or more (no splits), 32-token blocks beat 64: smaller tiles let more programs
# share an SM, so more loads are in flight (same section).
SMALL_BLOCK_PROGRAMS = 512


def default_num_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, block_k: int) -> int:
    """Splits per sequence so that seqs x kv_heads x splits programs fill the GPU."""
    programs = num_seqs * num_kv_heads
    by_occupancy = max(1, PROGRAMS_PER_SM * multiprocessor_count() // programs)
    by_length = max(1, max_kv_len // max(MIN_SPLIT_TOKENS, block_k))
    return min(by_occupancy, by_length)


def default_block_k(num_seqs: int, num_kv_heads: int) -> int:
    """Tokens per loop step: 32 once seqs x kv_heads programs are many, else 64."""
    return 32 if num_seqs * num_kv_heads >= SMALL_BLOCK_PROGRAMS else 64


def _decode_kernel(
    kv_lens_ref,
    kv_starts_ref,
    cu_q_lens_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    *out_refs,
    sm_scale: float,
    page_size: int,
    pages_per_seq: int,
    group: int,
    group_rows: int,
    block_k: int,
    num_splits: int,
    rows_are_seqs: bool,
    partial: bool,
):
    """q_ref: [tokens * q_heads, d]; k_ref, v_ref: [kv_heads, pages * page_size, d].

    Sequence i attends to its keys kv_starts[i]:kv_lens[i] (the keys before kv_starts are a shared
    prefix that the cascade's prefix pass covers). out_refs: (out [tokens * q_heads, d],)
    normalised, or with splits or `partial` the unnormalised softmax state (acc [splits,
    seqs * q_heads, d] f32, row max [splits, seqs * q_heads], row sum [splits, seqs * q_heads]).
    """
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_q_heads = k_ref.shape[0] * group
    q_start = cu_q_lens_ref[seq]
    is_decode = cu_q_lens_ref[seq + 1] - q_start == 1
    kv_len = jnp.where(is_decode, kv_lens_ref[seq], 0)
    # a sequence with q_len 0 may start at row `tokens`: clamp so its (unused) q load stays in bounds
    row = seq if rows_are_seqs else jnp.minimum(q_start, q_ref.shape[0] // num_q_heads - 1)

    g = jnp.arange(group_rows, dtype=jnp.int32)
    first_head_row = row * num_q_heads + head * group
    q = load_rows(q_ref, first_head_row + jnp.minimum(g, group - 1))

    kv_start = jnp.minimum(kv_starts_ref[seq], kv_len)
    split_len = pl.cdiv(pl.cdiv(kv_len - kv_start, num_splits), block_k) * block_k
    start = kv_start + split * split_len
    end = jnp.minimum(kv_len, start + split_len)
    offsets = jnp.arange(block_k, dtype=jnp.int32)
    table_base = seq * pages_per_seq

    def slots_at(i):
        tokens = start + i * block_k + offsets
        return token_slots(table_ref, table_base, jnp.minimum(tokens, jnp.maximum(kv_len - 1, 0)), page_size)

    def body(i, carry):
        *state, slots = carry
        next_slots = slots_at(i + 1)  # the next block's page ids load while this block computes
        tokens = start + i * block_k + offsets
        k = load_kv(k_ref, slots, head, q.dtype)
        v = load_kv(v_ref, slots, head, q.dtype)
        mask = jnp.broadcast_to((tokens < end)[None, :], (group_rows, block_k))
        return (*attend_block(q, k, v, tuple(state), sm_scale * LOG2E, mask), next_slots)

    num_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_k)
    acc, m, l, _ = jax.lax.fori_loop(0, num_blocks, body, (*init_carry(group_rows, q.shape[1]), slots_at(0)))

    out_rows = first_head_row + g
    ok = g < group
    if num_splits == 1 and not partial:
        (out_ref,) = out_refs
        store_rows(out_ref, out_rows, ok & (is_decode | rows_are_seqs), normalise(acc, l))
    else:
        acc_ref, m_ref, l_ref = out_refs
        store_rows(acc_ref, out_rows, ok, acc, split)
        store_rows(m_ref, out_rows, ok, m, split)
        store_rows(l_ref, out_rows, ok, l, split)


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array, dtype) -> jax.Array:
    """Merge per-split softmax states: acc [splits, rows, d], m, l [splits, rows] -> [rows, d]."""
    m_all = jnp.max(m, axis=0)
    weight = jnp.exp2(m - m_all[None])
    total = jnp.sum(l * weight, axis=0)
    out = jnp.sum(acc * weight[..., None], axis=0)
    return (out / jnp.where(total > 0, total, 1.0)[:, None]).astype(dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "rows_are_seqs", "partial", "block_k", "num_splits", "num_warps", "num_stages", "interpret",
    ),
)
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float,
    rows_are_seqs: bool = True,
    kv_starts: jax.Array | None = None,
    partial: bool = False,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 4,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of the q_len == 1 rows; layouts as in `reference.py` (pages in q's dtype or FP8,
    converted to q's dtype after each load). Returns [tokens, q_heads, d].

    rows_are_seqs=True: a decode bucket, row i is sequence i (tokens == seqs); every row is written
    (padding rows as zeros) and long sequences may be split. False: a mixed batch; only rows of
    sequences with q_len == 1 are written (at cu_q_lens[i]); the rest is left for the ragged kernel.
    kv_starts: [seqs] int32, keys before it are skipped (default 0). partial=True (decode bucket
    only) returns the unnormalised softmax state (acc [splits, rows, d], max [splits, rows], sum
    [splits, rows], base 2, rows = tokens * q_heads) for the cascade to merge with its prefix pass.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    group_rows = max(16, pl.next_power_of_2(group))
    if block_k is None:
        block_k = default_block_k(num_seqs, num_kv_heads)
    block_k = fit_tile(block_k, q.dtype)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, pages_per_seq * page_size, block_k)
    if rows_are_seqs and num_tokens != num_seqs:
        raise ValueError(f"rows_are_seqs needs one row per sequence: q has {num_tokens} rows, page_table {num_seqs}")
    if (num_splits > 1 or partial) and not rows_are_seqs:
        raise ValueError(f"num_splits={num_splits}, partial={partial} need rows_are_seqs=True (a pure decode bucket)")
    if kv_starts is None:
        kv_starts = jnp.zeros_like(kv_lens)

    kernel = functools.partial(
        _decode_kernel,
        sm_scale=sm_scale,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        group=group,
        group_rows=group_rows,
        block_k=block_k,
        num_splits=num_splits,
        rows_are_seqs=rows_are_seqs,
        partial=partial,
    )
    rows = num_tokens * num_q_heads
    if num_splits == 1 and not partial:
        out_shape = [jax.ShapeDtypeStruct((rows, head_dim), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, rows), jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name=f"paged_decode_bk{block_k}_s{num_splits}",
    )(
        kv_lens,
        kv_starts,
        cu_q_lens,
        page_table.reshape(-1),
        q.reshape(rows, head_dim),
        k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
        v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
    )
    if partial:
        return tuple(outs)
    out = outs[0] if num_splits == 1 else combine_splits(*outs, q.dtype)
    return out.reshape(num_tokens, num_q_heads, head_dim)
