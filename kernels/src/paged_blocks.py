"""Building blocks shared by the Pallas paged-attention kernels (Triton lowering on GPU, interpret on CPU).

Every load below uses clamped, in-bounds indices, so no load needs a mask: a key past a
sequence's length is read from its last real key and masked out of the softmax instead. That
keeps garbage (page 0 is the padding scratch page) out of `p @ v`, where a NaN times 0 would
still poison a real row. Stores write only real rows: masked lanes point one past the end of
the output, where Triton's mask skips them and interpret mode's scatter drops them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Finite, so that max/exp2 of a fully masked block never makes inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: compile for the GPU when JAX's default backend is one, else interpret."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return interpret


def compiler_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    """Triton launch shape: warps per program and software-pipelining depth of the KV loop."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def fit_tile(size: int, dtype: jnp.dtype) -> int:
    """A tile for these inputs: halved for 4-byte dtypes, so shared memory holds the bytes the bf16
    defaults were tuned for (full fp32 tiles ask for more shared memory than a Hopper SM has)."""
    return size // 2 if jnp.dtype(dtype).itemsize == 4 else size


def token_slots(table_ref, table_base: jax.Array, tokens: jax.Array, page_size: int) -> jax.Array:
    """Pool rows of a sequence's `tokens` ([n] int32, each < its kv_len).

    table_ref: [seqs * pages_per_seq] flattened page table; table_base is the sequence's offset in it.
    The page ids are gathered per token, so any page size works (power-of-two sizes compile to shifts).
    """
    pages = table_ref[table_base + tokens // page_size]
    return pages * page_size + tokens % page_size


def load_rows(ref, rows: jax.Array, head: jax.Array | None = None) -> jax.Array:
    """Gather whole rows: ref [rows_total, d] (or [heads, rows_total, d] with a head) -> [n, d]."""
    cols = jnp.arange(ref.shape[-1], dtype=jnp.int32)[None, :]
    if head is None:
        return ref[rows[:, None], cols]
    return ref[head, rows[:, None], cols]


def load_kv(ref, rows: jax.Array, head: jax.Array, dtype) -> jax.Array:
    """K or V rows of one kv head as `dtype` (q's): an FP8 page converts in registers after its load,
    so the kernel reads one byte per element from memory and computes in q's dtype."""
    return load_rows(ref, rows, head).astype(dtype)


def store_rows(ref, rows: jax.Array, ok: jax.Array, value: jax.Array, split: jax.Array | None = None) -> None:
    """Scatter value [n, d] (or [n] for a 1-d ref) into rows where ok ([n] bool) holds."""
    num_rows = ref.shape[-2] if value.ndim == 2 else ref.shape[-1]
    rows = jnp.where(ok, rows, num_rows)
    lead = () if split is None else (split,)
    if value.ndim == 1:
        plgpu.store(ref.at[(*lead, rows)], value.astype(ref.dtype), mask=ok)
        return
    cols = jnp.arange(value.shape[1], dtype=jnp.int32)[None, :]
    mask = jnp.broadcast_to(ok[:, None], value.shape)
    plgpu.store(ref.at[(*lead, rows[:, None], cols)], value.astype(ref.dtype), mask=mask)


def attend_block(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    scale_log2: float,
    mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step (base 2) of q [m, d] over a block of keys k, v [n, d].

    carry: (acc [m, d] f32 unnormalised output, row max [m] f32, row sum [m] f32); mask [m, n] or None.
    """
    acc, m_prev, l_prev = carry
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    scores = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    scores = scores * scale_log2
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(scores - m_next[:, None])
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    return acc * alpha[:, None] + pv, m_next, l_next


def init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Empty online-softmax state for `rows` query rows."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def normalise(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc / l per row; rows that saw no key (l == 0) come out as zeros, never NaN."""
    return acc / jnp.where(l > 0, l, 1.0)[:, None]


def block_schedule(
    cu_q_lens: jax.Array, num_tokens: int, block_q: int, align: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blocks of block_q rows of one sequence each (q_len > 1 only), then blocks of padding rows.

    Returns block_seq [blocks] (-1: padding rows, or an unused block), block_rows [blocks, 3]: the
    block's first row, a multiple of `align` (a TMA tile must start on one), then the first and
    one-past-last row it owns, and the number of blocks in use (they come first, the unused ones
    own no rows). Rows before the owned ones belong to the previous sequence: read only, never
    written. Longest-running blocks come first.
    """
    num_seqs = cu_q_lens.shape[0] - 1
    num_blocks = pl.cdiv(num_tokens + (align - 1) * (num_seqs + 1), block_q) + num_seqs + 1
    # "Sequence" num_seqs is the padding region: rows cu_q_lens[-1]:num_tokens.
    begins = cu_q_lens
    ends = jnp.concatenate([cu_q_lens[1:], jnp.full((1,), num_tokens, jnp.int32)])
    owned = jnp.concatenate([ends[:-1] - begins[:-1] > 1, jnp.ones((1,), bool)]) & (ends > begins)
    first_tiles = begins // align * align
    per_seq = jnp.where(owned, pl.cdiv(ends - first_tiles, block_q), 0)
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_seq, dtype=jnp.int32)])
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # compare_all: one fused compare-and-sum; the default binary search is a loop of ~log2(seqs) tiny launches.
    seq = jnp.searchsorted(cu_blocks, b, side="right", method="compare_all") - 1
    seq = jnp.clip(seq, 0, num_seqs).astype(jnp.int32)
    used = b < cu_blocks[-1]
    tile = first_tiles[seq] + (b - cu_blocks[seq]) * block_q
    first = jnp.maximum(tile, begins[seq])
    last = jnp.minimum(tile + block_q, ends[seq])
    block_seq = jnp.where(used & (seq < num_seqs), seq, -1)
    rows = jnp.where(used[:, None], jnp.stack([tile, first, last], axis=1), 0)
    # Later blocks of a sequence see more keys: run them first so the tail of the grid is short.
    order = jnp.where(used, cu_blocks[-1] - 1 - b, b)
    return block_seq[order], rows[order], cu_blocks[-1]


def check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens) -> None:
    """Shapes and dtypes of the ragged paged-attention inputs (`reference.py`), each error naming its input."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [kv_heads, pages, page_size, head_dim], got {k_pages.shape}, {v_pages.shape}"
        )
    if k_pages.dtype != v_pages.dtype or k_pages.dtype not in (q.dtype, jnp.dtype(jnp.float8_e4m3fn)):
        raise ValueError(
            f"k_pages and v_pages must both be q's dtype ({q.dtype}) or float8_e4m3fn, got {k_pages.dtype}, {v_pages.dtype}"
        )
    if q.shape[1] % k_pages.shape[0]:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k_pages.shape[0]})")
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"head_dim of q ({q.shape[2]}) and k_pages ({k_pages.shape[3]}) differ")
    if q.shape[2] & (q.shape[2] - 1):
        raise ValueError(f"head_dim must be a power of two (Triton tiles), got {q.shape[2]}")
    num_seqs = kv_lens.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != num_seqs:
        raise ValueError(f"page_table must be [seqs={num_seqs}, pages_per_seq], got {page_table.shape}")
    if cu_q_lens.shape != (num_seqs + 1,):
        raise ValueError(f"cu_q_lens must be [seqs + 1] = [{num_seqs + 1}], got {cu_q_lens.shape}")
    for name, x in (("kv_lens", kv_lens), ("page_table", page_table), ("cu_q_lens", cu_q_lens)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
