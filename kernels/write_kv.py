"""KV write: the step's new K/V rows into their slots of the paged pool, in place.

XLA's scatter (`write_kv_reference`) is in place too when the pools are donated, but on an H100
it took 11.8 us per layer for 256 tokens of Qwen3-0.6B inside one program, this kernel 8.3 us
(benchmarks/RESULTS.md; both far above the 1 us that 2 MiB of traffic needs: launch-bound).
One program per token reads the token's rows for all kv heads and stores each as one contiguous
head_dim vector at its slot. The pools are aliased to the outputs, so under a jit that donates
them nothing but the new rows moves. kv_heads and head_dim must be powers of two (Triton ranges).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .paged_blocks import compiler_params, resolve_interpret


def _write_kv_kernel(slots_ref, k_ref, v_ref, _k_pool_in, _v_pool_in, k_pool_ref, v_pool_ref):
    """k_ref, v_ref: [tokens, kv_heads, d]; k_pool_ref, v_pool_ref: [kv_heads, pages * page_size, d]."""
    token = pl.program_id(0)
    slot = slots_ref[token]
    num_kv_heads, head_dim = k_ref.shape[1], k_ref.shape[2]
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None]
    cols = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    plgpu.store(k_pool_ref.at[heads, slot, cols], k_ref[token, heads, cols].astype(k_pool_ref.dtype))
    plgpu.store(v_pool_ref.at[heads, slot, cols], v_ref[token, heads, cols].astype(v_pool_ref.dtype))


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V [tokens, kv_heads, head_dim] into pools [kv_heads, pages, page_size, head_dim].

    slot_mapping: [tokens] int32, page * page_size + offset (padding tokens point into page 0).
    Same result as `write_kv_reference`; donate the pools to the enclosing jit to write in place.
    """
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k and v must be [tokens, {num_kv_heads}, {head_dim}], got {k.shape} and {v.shape}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be int32 [{k.shape[0]}], got {slot_mapping.dtype} {slot_mapping.shape}")
    flat = (num_kv_heads, num_pages * page_size, head_dim)
    k_pool, v_pool = pl.pallas_call(
        _write_kv_kernel,
        grid=(k.shape[0],),
        out_shape=[jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=compiler_params(num_warps=1, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="write_kv",
    )(slot_mapping, k, v, k_pages.reshape(flat), v_pages.reshape(flat))
    return k_pool.reshape(k_pages.shape), v_pool.reshape(v_pages.shape)
