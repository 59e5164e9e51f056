"""Pure-jnp references for the paged-attention kernels: the test oracle and the `reference` backend.

Layouts (the contract every backend follows):
  q:          [tokens, q_heads, head_dim]      new query tokens of all sequences, ragged, concatenated
  k_pages:    [kv_heads, num_pages, page_size, head_dim]   one layer's K pool (V alike)
  kv_lens:    [seqs] int32      keys of sequence i = cached prefix + its new tokens (already written)
  page_table: [seqs, pages_per_seq] int32   page ids of sequence i, in order, any page order in the pool
  cu_q_lens:  [seqs + 1] int32  sequence i owns query rows cu_q_lens[i]:cu_q_lens[i+1]
  slot_mapping: [tokens] int32  page * page_size + offset where token t's K/V is written

The pool may be float8_e4m3fn (an FP8 KV cache): the write stores k / k_scale clipped to the
e4m3 range (+-448; a cast past it gives NaN, as e4m3fn has no inf), and every reader converts a
loaded page to q's dtype. The scales never reach the kernels: the attention layer folds k_scale
into q and multiplies the output by v_scale (layers/attention.py).

Query row j of sequence i sits at position kv_lens[i] - q_len[i] + j and attends to keys at
positions <= its own (causal inside the new tokens, full over the cached prefix).
Padding sequences have q_len 0 and kv_len 0; rows at or past cu_q_lens[-1] are padding and their
output is unspecified (this reference writes zeros there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minisgl_jax.utils import cdiv

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
ROW_BLOCK = 128  # query rows per block: bounds the gathered keys to [kv_heads, ROW_BLOCK, max_kv, head_dim]


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float,
) -> jax.Array:
    """Attention of ragged query rows over paged K/V; returns [tokens, q_heads, head_dim] in q.dtype."""
    num_tokens = q.shape[0]
    if num_tokens <= ROW_BLOCK:
        rows = jnp.arange(num_tokens, dtype=jnp.int32)
        return _attend_rows(q, rows, k_pages, v_pages, kv_lens, page_table, cu_q_lens, sm_scale)
    num_blocks = cdiv(num_tokens, ROW_BLOCK)
    padded = jnp.pad(q, ((0, num_blocks * ROW_BLOCK - num_tokens), (0, 0), (0, 0)))
    blocks = padded.reshape(num_blocks, ROW_BLOCK, *q.shape[1:])
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * ROW_BLOCK

    def block(args):
        q_block, start = args
        rows = start + jnp.arange(ROW_BLOCK, dtype=jnp.int32)
        return _attend_rows(q_block, rows, k_pages, v_pages, kv_lens, page_table, cu_q_lens, sm_scale)

    out = jax.lax.map(block, (blocks, starts))
    return out.reshape(num_blocks * ROW_BLOCK, *q.shape[1:])[:num_tokens]


def _attend_rows(q, rows, k_pages, v_pages, kv_lens, page_table, cu_q_lens, sm_scale):
    """Attention for the query rows `rows` (q: [rows, q_heads, head_dim])."""
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = page_table.shape
    group = num_q_heads // num_kv_heads
    max_kv = pages_per_seq * page_size

    seq = jnp.clip(jnp.searchsorted(cu_q_lens, rows, side="right") - 1, 0, num_seqs - 1)
    row_valid = rows < cu_q_lens[-1]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])

    # keys of each row's sequence: [kv_heads, rows, max_kv, head_dim]
    k_tok = k_pages[:, page_table[seq]].reshape(num_kv_heads, num_rows, max_kv, head_dim).astype(q.dtype)
    v_tok = v_pages[:, page_table[seq]].reshape(num_kv_heads, num_rows, max_kv, head_dim).astype(q.dtype)

    qg = q.reshape(num_rows, num_kv_heads, group, head_dim)
    scores = jnp.einsum("thgd,htkd->thgk", qg, k_tok, preferred_element_type=jnp.float32) * sm_scale
    key_pos = jnp.arange(max_kv, dtype=jnp.int32)
    mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < kv_lens[seq][:, None])
    mask = mask & row_valid[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("thgk,htkd->thgd", probs, v_tok.astype(jnp.float32)) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(num_rows, num_q_heads, head_dim).astype(q.dtype)


def quantize_kv(x: jax.Array, scale: float, dtype) -> jax.Array:
    """x as the pool stores it: cast to a float pool's dtype, or x / scale saturated to +-448 in FP8."""
    if jnp.dtype(dtype) != FP8_DTYPE:
        return x.astype(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(dtype)


def write_kv_reference(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V rows [tokens, kv_heads, head_dim] into their slots; in place when donated.

    k_scale, v_scale: the FP8 pool's per-layer scales (ignored by a float pool)."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    flat = (num_kv_heads, num_pages * page_size, head_dim)
    k_rows = quantize_kv(k.transpose(1, 0, 2), k_scale, k_pages.dtype)
    v_rows = quantize_kv(v.transpose(1, 0, 2), v_scale, v_pages.dtype)
    k_pages = k_pages.reshape(flat).at[:, slot_mapping].set(k_rows)
    v_pages = v_pages.reshape(flat).at[:, slot_mapping].set(v_rows)
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    return k_pages.reshape(shape), v_pages.reshape(shape)
