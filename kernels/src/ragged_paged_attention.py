"""Ragged paged attention: prefill chunks over a cached prefix, decodes, and mixes of both in one call.

The entry point `ragged_paged_attention` runs up to two Pallas kernels into one output buffer:
- rows of sequences with q_len == 1 (decodes) go to the decode kernel (paged_decode_attention.py);
- rows of sequences with q_len > 1 go to the block kernel below, which also zeroes padding rows.
With the static hint max_q_len=1 (a decode bucket) only the decode kernel runs, with split-K.

Block kernel: the ragged rows are cut into blocks of block_q tokens that never straddle two
sequences (at most cdiv(tokens, block_q) + seqs blocks, a static bound). A program takes one
block and one kv head, and stacks the block's tokens x the group's q heads into block_m rows of
one tensor-core dot, so each K/V block is loaded once for all heads that share it. Keys below the
block's first query position need no causal mask (first loop); the rest are masked (second loop).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .paged_blocks import (
    LOG2E,
    attend_block,
    block_schedule,
    check_inputs,
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
from .paged_decode_attention import paged_decode_attention


def _block_kernel(
    block_seq_ref,
    block_rows_ref,
    kv_lens_ref,
    cu_q_lens_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    _written_ref,
    out_ref,
    *,
    sm_scale: float,
    page_size: int,
    pages_per_seq: int,
    group: int,
    block_m: int,
    block_k: int,
):
    """q_ref, out_ref: [tokens * q_heads, d]; k_ref, v_ref: [kv_heads, pages * page_size, d].

    block_seq_ref: [blocks] sequence of each block, -1 for a block of padding rows to zero;
    block_rows_ref: [blocks, 3] (`block_schedule`, unaligned: first row, first and last owned row).
    _written_ref aliases out_ref: rows the decode kernel wrote, left as they are.
    """
    block, head = pl.program_id(0), pl.program_id(1)
    num_q_heads = k_ref.shape[0] * group
    seq = block_seq_ref[block]
    row_begin = block_rows_ref[block, 1]
    row_end = block_rows_ref[block, 2]

    m = jnp.arange(block_m, dtype=jnp.int32)
    tokens = row_begin + m // group
    head_rows = head * group + m % group
    ok = (tokens < row_end) & (m < (block_m // group) * group)
    out_rows = tokens * num_q_heads + head_rows

    @pl.when(seq < 0)
    def _zero_padding_rows():
        store_rows(out_ref, out_rows, ok, jnp.zeros((block_m, out_ref.shape[1]), jnp.float32))

    @pl.when(seq >= 0)
    def _attend():
        tokens_in = jnp.minimum(tokens, row_end - 1)
        q = load_rows(q_ref, tokens_in * num_q_heads + head_rows)
        q_begin = cu_q_lens_ref[seq]
        kv_len = kv_lens_ref[seq]
        prefix = kv_len - (cu_q_lens_ref[seq + 1] - q_begin)
        positions = prefix + tokens_in - q_begin  # [block_m] key position of each row's token
        first_pos = prefix + row_begin - q_begin
        last_pos = prefix + row_end - 1 - q_begin
        offsets = jnp.arange(block_k, dtype=jnp.int32)
        table_base = seq * pages_per_seq

        def slots_at(i):
            keys = i * block_k + offsets
            return token_slots(table_ref, table_base, jnp.minimum(keys, kv_len - 1), page_size)

        def step(i, carry, causal: bool):
            *state, slots = carry
            next_slots = slots_at(i + 1)  # the next block's page ids load while this block computes
            k, v = load_kv(k_ref, slots, head, q.dtype), load_kv(v_ref, slots, head, q.dtype)
            mask = (i * block_k + offsets)[None, :] <= positions[:, None] if causal else None
            return (*attend_block(q, k, v, tuple(state), sm_scale * LOG2E, mask), next_slots)

        num_full = (first_pos + 1) // block_k  # blocks every row of this block sees whole
        carry = (*init_carry(block_m, q.shape[1]), slots_at(0))
        carry = jax.lax.fori_loop(0, num_full, functools.partial(step, causal=False), carry)
        carry = jax.lax.fori_loop(num_full, pl.cdiv(last_pos + 1, block_k), functools.partial(step, causal=True), carry)
        acc, _, l, _ = carry
        store_rows(out_ref, out_rows, ok, normalise(acc, l))


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "max_q_len", "interpret", "block_m", "block_k", "num_warps", "num_stages"),
)
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float,
    max_q_len: int | None = None,
    interpret: bool | None = None,
    block_m: int = 256,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
) -> jax.Array:
    """Attention of ragged new tokens over paged K/V (layouts and semantics: `reference.py`).

    q: [tokens, q_heads, head_dim]; k_pages, v_pages: [kv_heads, pages, page_size, head_dim] in q's
    dtype or float8_e4m3fn (converted to q's dtype after each load; scales are the caller's);
    kv_lens: [seqs] int32; page_table: [seqs, pages_per_seq] int32; cu_q_lens: [seqs + 1] int32.
    Returns [tokens, q_heads, head_dim] in q.dtype; padding rows come out as zeros.
    Any page size works (page ids are looked up per key); any q_heads / kv_heads ratio.

    max_q_len: static hint. 1 promises a decode bucket (tokens == seqs, every q_len 0 or 1) and
    runs the split-K decode kernel alone; None allows any mix. interpret: None interprets unless
    JAX's default backend is a GPU. block_m (rows of tokens x group heads), block_k (keys per step),
    num_warps, num_stages tune the block kernel; the defaults were tuned on Hopper (4-byte inputs
    halve block_m and block_k: `fit_tile`).
    """
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens)
    interpret = resolve_interpret(interpret)
    if max_q_len == 1:
        return paged_decode_attention(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, sm_scale=sm_scale, interpret=interpret
        )
    if max_q_len is not None and max_q_len < 1:
        raise ValueError(f"max_q_len must be None or >= 1, got {max_q_len}")

    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    block_m, block_k = fit_tile(block_m, q.dtype), fit_tile(block_k, q.dtype)
    if group > block_m:
        raise ValueError(f"block_m ({block_m}) must hold at least one token's {group} q heads per kv head")
    decoded = paged_decode_attention(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
        sm_scale=sm_scale, rows_are_seqs=False, num_splits=1, interpret=interpret,
    )
    block_seq, block_rows, _ = block_schedule(cu_q_lens, num_tokens, block_m // group)
    kernel = functools.partial(
        _block_kernel,
        sm_scale=sm_scale,
        page_size=page_size,
        pages_per_seq=page_table.shape[1],
        group=group,
        block_m=block_m,
        block_k=block_k,
    )
    rows = num_tokens * num_q_heads
    out = pl.pallas_call(
        kernel,
        grid=(block_seq.shape[0], num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((rows, head_dim), q.dtype),
        input_output_aliases={8: 0},
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bm{block_m}_bk{block_k}",
    )(
        block_seq,
        block_rows,
        kv_lens,
        cu_q_lens,
        page_table.reshape(-1),
        q.reshape(rows, head_dim),
        k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
        v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
        decoded.reshape(rows, head_dim),
    )
    return out.reshape(num_tokens, num_q_heads, head_dim)
