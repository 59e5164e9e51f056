"""Random paged-attention inputs for the kernel tests: shuffled pages, optional padding, NaN scratch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def make_batch(
    seed: int,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    page_size: int,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype=jnp.float32,
    pad_rows: int = 0,
    pad_seqs: int = 0,
    spare_pages: int = 2,
) -> tuple[jax.Array, ...]:
    """(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens) as the engine builds them.

    Pages are handed out in a random order; page 0 is the scratch page, and table entries past a
    sequence's last page are 0. pad_rows extra query rows and pad_seqs sequences with q_len 0 and
    kv_len 0 make a padded bucket.
    """
    rng = np.random.default_rng(seed)
    need = [-(-k // page_size) for k in kv_lens]
    num_pages = sum(need) + 1 + spare_pages
    width = max(need) + 1
    order = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    table = np.zeros((len(kv_lens) + pad_seqs, width), np.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = order[used : used + n]
        used += n
    cu = np.concatenate([[0], np.cumsum(list(q_lens) + [0] * pad_seqs)]).astype(np.int32)
    lens = np.asarray(list(kv_lens) + [0] * pad_seqs, np.int32)
    q = rng.standard_normal((sum(q_lens) + pad_rows, q_heads, head_dim), np.float32)
    k = rng.standard_normal((kv_heads, num_pages, page_size, head_dim), np.float32)
    v = rng.standard_normal((kv_heads, num_pages, page_size, head_dim), np.float32)
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(lens),
        jnp.asarray(table),
        jnp.asarray(cu),
    )


def poison_unused_slots(k_pages: jax.Array, kv_lens: jax.Array, page_table: jax.Array) -> jax.Array:
    """NaN in every pool slot that holds no live key: page 0, spare pages, tails of last pages."""
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    live = np.zeros((num_pages, page_size), bool)
    for table_row, kv_len in zip(np.asarray(page_table), np.asarray(kv_lens)):
        for t in range(int(kv_len)):
            live[table_row[t // page_size], t % page_size] = True
    return jnp.where(jnp.asarray(live)[None, :, :, None], k_pages, jnp.nan)


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    """‖out − ref‖ / ‖ref‖ in float32; NaN anywhere in out makes it NaN (and fails any bound)."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
