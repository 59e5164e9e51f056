"""Cascade decode attention: a key prefix that many sequences share is read once for all of them.

When the radix cache hands the same pages to many running requests (a system prompt, few-shot
examples), plain decode attention reads those pages once per sequence. The cascade splits each
row's keys in two:
- the prefix pass: for each group of rows sharing their first `prefix_len` keys, one program per
  (block of rows, kv head, split) loads each prefix key block once and attends all the group's
  rows x q heads to it at once: no causal mask, since every decode query sits after the prefix;
- the suffix pass: the decode kernel over each row's own keys, prefix_len:kv_len;
and merges the two unnormalised softmax states (log-sum-exp weights, base 2).

Groups (made by the engine from the page tables, engine/cascade.py) are contiguous row ranges:
groups [max_groups, 3] int32 holds (first row, one past the last row, shared prefix length in
keys) per group, a group with no rows is padding; prefix_lens [seqs] is each row's group prefix
length, 0 for a row in no group. The prefix pages are those of the group's first row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .paged_blocks import (
    LOG2E,
    MASK_VALUE,
    attend_block,
    compiler_params,
    fit_tile,
    init_carry,
    load_kv,
    load_rows,
    resolve_interpret,
    store_rows,
    token_slots,
)
from .device import multiprocessor_count
from .paged_decode_attention import combine_splits, paged_decode_attention

PROGRAMS_PER_SM = 2  # two programs per multiprocessor keep the tensor cores busy
MAX_PREFIX_SPLITS = 4  # each split writes a float32 partial state per row: more costs more in the merge


def _prefix_kernel(
    block_group_ref,
    block_rows_ref,
    groups_ref,
    table_ref,
    q_ref,
    k_ref,
    v_ref,
    acc_ref,
    m_ref,
    l_ref,
    *,
    sm_scale: float,
    page_size: int,
    pages_per_seq: int,
    group: int,
    block_m: int,
    block_k: int,
    num_splits: int,
):
    """A block of one group's rows x one kv head's q heads over one split of the group's prefix.

    q_ref: [seqs * q_heads, d]; k_ref, v_ref: [kv_heads, pages * page_size, d];
    acc_ref [splits, seqs * q_heads, d], m_ref, l_ref [splits, seqs * q_heads]: base-2 softmax state.
    """
    block, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_q_heads = k_ref.shape[0] * group
    cascade_group = block_group_ref[block]

    @pl.when(cascade_group >= 0)
    def _attend():
        row_begin = block_rows_ref[block, 0]
        row_end = block_rows_ref[block, 1]
        m = jnp.arange(block_m, dtype=jnp.int32)
        rows = row_begin + m // group
        head_rows = head * group + m % group
        ok = (rows < row_end) & (m < (block_m // group) * group)
        q = load_rows(q_ref, jnp.minimum(rows, row_end - 1) * num_q_heads + head_rows)

        prefix_len = groups_ref[cascade_group, 2]
        split_len = pl.cdiv(pl.cdiv(prefix_len, num_splits), block_k) * block_k
        start = split * split_len
        end = jnp.minimum(prefix_len, start + split_len)
        offsets = jnp.arange(block_k, dtype=jnp.int32)
        table_base = groups_ref[cascade_group, 0] * pages_per_seq

        def slots_at(i):
            keys = jnp.minimum(start + i * block_k + offsets, prefix_len - 1)
            return token_slots(table_ref, table_base, keys, page_size)

        def body(i, carry):
            *state, slots = carry
            next_slots = slots_at(i + 1)
            k, v = load_kv(k_ref, slots, head, q.dtype), load_kv(v_ref, slots, head, q.dtype)
            mask = jnp.broadcast_to((start + i * block_k + offsets < end)[None, :], (block_m, block_k))
            return (*attend_block(q, k, v, tuple(state), sm_scale * LOG2E, mask), next_slots)

        num_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_k)
        acc, row_max, row_sum, _ = jax.lax.fori_loop(
            0, num_blocks, body, (*init_carry(block_m, q.shape[1]), slots_at(0))
        )
        out_rows = rows * num_q_heads + head_rows
        store_rows(acc_ref, out_rows, ok, acc, split)
        store_rows(m_ref, out_rows, ok, row_max, split)
        store_rows(l_ref, out_rows, ok, row_sum, split)


def _group_blocks(groups: jax.Array, block_rows: int, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Cut each group's rows into blocks of block_rows: (group of each block or -1, [blocks, 2] row range)."""
    sizes = jnp.where(groups[:, 2] > 0, jnp.maximum(groups[:, 1] - groups[:, 0], 0), 0)
    per_group = pl.cdiv(sizes, block_rows)
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_group, dtype=jnp.int32)])
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    g = jnp.clip(jnp.searchsorted(cu_blocks, b, side="right") - 1, 0, groups.shape[0] - 1).astype(jnp.int32)
    begin = groups[g, 0] + (b - cu_blocks[g]) * block_rows
    end = jnp.minimum(begin + block_rows, groups[g, 1])
    block_group = jnp.where(b < cu_blocks[-1], g, -1)
    return block_group, jnp.stack([begin, end], axis=1)


def _check_groups(num_seqs: int, prefix_lens: jax.Array, groups: jax.Array) -> None:
    if prefix_lens.shape != (num_seqs,) or prefix_lens.dtype != jnp.int32:
        raise ValueError(f"prefix_lens must be int32 [seqs={num_seqs}], got {prefix_lens.dtype} {prefix_lens.shape}")
    if groups.ndim != 2 or groups.shape[1] != 3 or groups.dtype != jnp.int32:
        raise ValueError(f"groups must be int32 [max_groups, 3], got {groups.dtype} {groups.shape}")


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "interpret", "block_m", "block_k", "prefix_splits", "num_warps", "num_stages"),
)
def cascade_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    prefix_lens: jax.Array,
    groups: jax.Array,
    *,
    sm_scale: float,
    interpret: bool | None = None,
    block_m: int = 256,
    block_k: int = 64,
    prefix_splits: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
) -> jax.Array:
    """Decode attention (one query row per sequence, a decode bucket) with shared prefixes read once.

    Layouts and result as `paged_decode_attention`; prefix_lens and groups as in the module doc.
    Every row's keys must really begin with its group's prefix pages: the engine groups rows by
    identical page ids, so that holds by construction.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    _check_groups(num_seqs, prefix_lens, groups)
    block_m, block_k = fit_tile(block_m, q.dtype), fit_tile(block_k, q.dtype)
    if group > block_m:
        raise ValueError(f"block_m ({block_m}) must hold at least one row's {group} q heads per kv head")
    acc_d, m_d, l_d = paged_decode_attention(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
        sm_scale=sm_scale, kv_starts=prefix_lens, partial=True, interpret=interpret,
    )

    block_rows = block_m // group
    num_blocks = pl.cdiv(num_seqs, block_rows) + groups.shape[0]
    if prefix_splits is None:
        target = PROGRAMS_PER_SM * multiprocessor_count()
        prefix_splits = max(1, min(MAX_PREFIX_SPLITS, target // (pl.cdiv(num_seqs, block_rows) * num_kv_heads)))
    block_group, block_row_ranges = _group_blocks(groups, block_rows, num_blocks)
    rows = num_seqs * num_q_heads
    kernel = functools.partial(
        _prefix_kernel,
        sm_scale=sm_scale,
        page_size=page_size,
        pages_per_seq=page_table.shape[1],
        group=group,
        block_m=block_m,
        block_k=block_k,
        num_splits=prefix_splits,
    )
    acc_p, m_p, l_p = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads, prefix_splits),
        out_shape=[
            jax.ShapeDtypeStruct((prefix_splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((prefix_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((prefix_splits, rows), jnp.float32),
        ],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name=f"cascade_prefix_bm{block_m}_bk{block_k}_s{prefix_splits}",
    )(
        block_group,
        block_row_ranges,
        groups,
        page_table.reshape(-1),
        q.reshape(rows, head_dim),
        k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
        v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
    )
    # Rows in no group have no prefix state (their slots were never written): make it empty.
    has_prefix = jnp.repeat(prefix_lens > 0, num_q_heads)[None]
    acc_p = jnp.where(has_prefix[..., None], acc_p, 0.0)
    m_p = jnp.where(has_prefix, m_p, MASK_VALUE)
    l_p = jnp.where(has_prefix, l_p, 0.0)
    out = combine_splits(
        jnp.concatenate([acc_d, acc_p]), jnp.concatenate([m_d, m_p]), jnp.concatenate([l_d, l_p]), q.dtype
    )
    return out.reshape(num_seqs, num_q_heads, head_dim)
