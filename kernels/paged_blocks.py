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
    defaults were tuned for (full fp32 tiles ask an H200 for 321 KiB of its 227 KiB)."""
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
